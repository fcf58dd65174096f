"""Run a judge over tasks, appending judgment records (docs/judgments.md) as they finish.

The output file is resumable: tasks whose ``(id, model, baseline, judge, order)`` already has a
line are skipped, so a rerun after a crash or Ctrl-C only judges what is missing. Each record is
one ``write`` of one line followed by a flush; a torn last line (the process killed mid-write) is cut
off on the next run, so the file always holds whole records.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jsonlines

from cme_rewards.io import InputError, atomic_write_jsonl, read_jsonl
from cme_rewards.judge.backends import Verdict
from cme_rewards.judge.pairs import Task

logger = logging.getLogger(__name__)
_DUMPS = partial(json.dumps, ensure_ascii=False, allow_nan=False)


def record_key(rec: dict[str, Any]) -> tuple:
    """``(id, model, baseline, judge, order)`` of a judgment record, as :meth:`Task.key` gives it."""
    return tuple(rec.get(name) for name in ("id", "model", "baseline", "judge", "order"))


def _repair_tail(path: Path) -> None:
    """Cut a torn last line (no trailing newline, or not JSON) left by a killed run."""
    with path.open("rb+") as fh:
        data = fh.read()
        if not data or data.endswith(b"\n"):
            return
        start = data.rfind(b"\n") + 1
        try:
            json.loads(data[start:])
            fh.write(b"\n")  # a whole record that only lacks its newline
            return
        except ValueError:
            logger.warning(
                "%r: dropping an incomplete last line left by an interrupted run", str(path)
            )
            fh.truncate(start)


def existing_records(path: Path, retry_errors: bool = False) -> list[dict[str, Any]]:
    """Records already in ``path`` (after repairing a torn tail). With ``retry_errors`` the error
    records are removed from the file (atomically), so their tasks are judged again."""
    if not path.exists():
        return []
    _repair_tail(path)
    records = [rec for _, rec in read_jsonl(path)]
    if retry_errors and any(r.get("error") is not None for r in records):
        records = [r for r in records if r.get("error") is None]
        atomic_write_jsonl(path, records)
    return records


def to_record(task: Task, judge: str, verdict: Verdict) -> dict[str, Any]:
    """The judgment record for one task (the fields of docs/judgments.md, plus ``raw``, ``attempts`` and extras)."""
    p = task.pair
    rec: dict[str, Any] = {
        "id": p.id,
        "instruction": p.instruction,
        "model": p.model,
        "baseline": p.baseline,
        "output_model": p.output_model,
        "output_baseline": p.output_baseline,
        "judge": judge,
        "order": task.order,
        "winner": verdict.winner,
        "preference": verdict.preference,
        "error": verdict.error,
        "raw": verdict.raw,
        "attempts": verdict.attempts,
    }
    if p.reference is not None:
        rec["reference_preference"] = p.reference
    rec.update(verdict.extra)
    return rec


async def _run(
    tasks: Sequence[Task], backend, judge: str, out_path: Path, progress: bool
) -> dict[str, int]:
    from tqdm.auto import tqdm

    await backend.check()  # before the output file is touched
    semaphore = asyncio.Semaphore(backend.concurrency)
    counts = {"judged": 0, "errors": 0}

    async def one(task: Task) -> tuple[Task, Verdict]:
        async with semaphore:
            return task, await backend(task)

    bar = tqdm(total=len(tasks), desc=f"judge {judge}", disable=not progress, unit="pair")
    pending = [asyncio.ensure_future(one(t)) for t in tasks]
    try:
        with (
            out_path.open("a", encoding="utf-8") as fh,
            jsonlines.Writer(fh, compact=True, flush=True, dumps=_DUMPS) as writer,
        ):
            for fut in asyncio.as_completed(pending):
                task, verdict = await fut
                writer.write(to_record(task, judge, verdict))
                counts["judged"] += 1
                counts["errors"] += verdict.error is not None
                bar.update(1)
    finally:
        for fut in pending:
            fut.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        bar.close()
    return counts


def run_judge(
    tasks: Sequence[Task],
    backend,
    out_path: str | os.PathLike,
    *,
    judge: str | None = None,
    retry_errors: bool = False,
    progress: bool = True,
) -> dict[str, int]:
    """Judge every task not yet in ``out_path`` and append its record; returns counts
    ``{"skipped", "judged", "errors"}``."""
    judge = judge or backend.name
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        done = {record_key(r) for r in existing_records(out_path, retry_errors)}
    except InputError as exc:
        raise InputError(f"cannot resume from {out_path}: {exc}") from None
    todo = [t for t in tasks if t.key(judge) not in done]
    counts = (
        asyncio.run(_run(todo, backend, judge, out_path, progress))
        if todo
        else {"judged": 0, "errors": 0}
    )
    counts["skipped"] = len(tasks) - len(todo)
    return counts
