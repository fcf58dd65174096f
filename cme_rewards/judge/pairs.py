"""What the judge compares: pairs of answers to one prompt, and the order each is shown in."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cme_rewards.io import InputError, read_jsonl
from cme_rewards.winrate.load import (
    ORDERS,
    BadField,
    Judgment,
    judgment_from_annotation,
    read_records,
    text_field,
)


@dataclass(frozen=True)
class Pair:
    """The model's and the baseline's answer to one prompt; ``reference`` is a reference judge's
    AlpacaEval preference in [1, 2] (2 = model wins) when the pair comes from an annotations file."""

    id: str
    instruction: str
    model: str
    baseline: str
    output_model: str
    output_baseline: str
    reference: float | None = None


@dataclass(frozen=True)
class Task:
    """One presentation of a pair to the judge."""

    pair: Pair
    order: str  # "model_first" | "baseline_first"

    @property
    def answers(self) -> tuple[str, str]:
        """(answer A, answer B) as shown to the judge."""
        p = self.pair
        if self.order == "model_first":
            return p.output_model, p.output_baseline
        return p.output_baseline, p.output_model

    def key(self, judge: str) -> tuple[str, str, str, str, str]:
        return (self.pair.id, self.pair.model, self.pair.baseline, judge, self.order)


def _read_outputs(path: Path) -> tuple[dict[str, dict], str | None]:
    """``{prompt id: {"instruction", "output"}}`` and the file's single ``generator`` (if any)."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    out: dict[str, dict] = {}
    generators: set[str] = set()
    for line, rec in read_jsonl(path):
        for name in ("instruction", "output"):
            if not isinstance(rec.get(name), str):
                raise InputError(f"{path}:{line}: field '{name}': missing or not a string")
        pid = rec.get("id", rec["instruction"])
        if not isinstance(pid, (str, int)):
            raise InputError(f"{path}:{line}: field 'id': expected a string")
        pid = str(pid)
        if pid in out:
            raise InputError(f"{path}:{line}: field 'id': duplicate prompt id {pid!r}")
        if isinstance(rec.get("generator"), str):
            generators.add(rec["generator"])
        out[pid] = {"instruction": rec["instruction"], "output": rec["output"]}
    if not out:
        raise InputError(f"{path}: no outputs")
    return out, (generators.pop() if len(generators) == 1 else None)


def pairs_from_outputs(
    model_path: str | Path,
    baseline_path: str | Path,
    model_name: str | None = None,
    baseline_name: str | None = None,
) -> list[Pair]:
    """Join two output JSONL files (``id`` or ``instruction``, ``output``, optional ``generator``)
    on the prompt id; names come from the options, else ``generator``, else the file name."""
    model_path, baseline_path = Path(model_path), Path(baseline_path)
    model_out, model_gen = _read_outputs(model_path)
    base_out, base_gen = _read_outputs(baseline_path)
    model = model_name or model_gen or model_path.stem
    baseline = baseline_name or base_gen or baseline_path.stem
    missing = [pid for pid in model_out if pid not in base_out]
    if missing:
        raise InputError(
            f"{baseline_path}: no baseline output for {len(missing)} prompt id(s) of {model_path}, "
            f"e.g. {missing[0]!r}"
        )
    return [
        Pair(pid, rec["instruction"], model, baseline, rec["output"], base_out[pid]["output"])
        for pid, rec in model_out.items()
    ]


def pairs_from_annotations(paths: Iterable[str | Path], limit: int | None = None) -> list[Pair]:
    """Pairs carrying a reference preference, from AlpacaEval annotations files (``output_1`` =
    baseline, ``output_2`` = model); rows with a NaN reference are left out. ``limit`` per file."""
    pairs: list[Pair] = []
    for path in map(Path, paths):
        annotations, items = read_records(path)
        if not annotations:
            raise InputError(f"{path}: expected a JSON array of AlpacaEval annotations")
        kept = 0
        for i, (line, rec) in enumerate(items, start=1):
            if limit is not None and kept >= limit:
                break
            try:
                j = judgment_from_annotation(rec)
                outputs = [text_field(rec, name) for name in ("output_2", "output_1")]
            except BadField as exc:
                raise InputError(f"{path}: line {line} (record {i}): {exc}") from None
            if isinstance(j, Judgment):
                pairs.append(Pair(j.prompt, j.prompt, j.model, j.baseline, *outputs, 1.0 + j.q))
                kept += 1
    return pairs


def make_tasks(pairs: Iterable[Pair], orders: str = "both", seed: int = 0) -> list[Task]:
    """Both orders of every pair (``orders="both"``), or one order per pair drawn from a generator
    seeded by ``(seed, prompt id)`` so a rerun draws the same order (``orders="random"``)."""
    if orders not in ("both", "random"):
        raise ValueError(f"orders must be 'both' or 'random', got {orders!r}")
    tasks: list[Task] = []
    for pair in pairs:
        if orders == "both":
            tasks.extend(Task(pair, order) for order in ORDERS)
        else:
            rng = random.Random(f"{seed}:{pair.id}:{pair.model}:{pair.baseline}")
            tasks.append(Task(pair, rng.choice(ORDERS)))
    return tasks
