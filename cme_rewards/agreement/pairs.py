"""Answer pairs with a judge's preference, read with the win-rate module's record readers.

Inputs are AlpacaEval ``annotations.json`` files as they are (``output_1`` = first answer, the
baseline; ``output_2`` = second answer, the model) and the judgment JSONL that ``cme-rewards judge``
writes (``output_baseline`` = first, ``output_model`` = second; both answers are required here).

A pair is one (prompt, model, baseline) of one file. Its preference is AlpacaEval's scale in
[1, 2] (2 = the second answer wins, 1.5 = tie), averaged over the pair's judgments (a judge JSONL
holds both presentation orders). Rows without a verdict (NaN preference, judge error) are counted
in :attr:`PairFile.n_no_verdict`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from cme_rewards.io import InputError
from cme_rewards.winrate import load as winrate_load

TIE = 1.5
"""AlpacaEval's tie preference: above it the judge prefers the second answer."""


@dataclass(frozen=True)
class Pair:
    """Two answers to one prompt and the judge's preference between them.

    ``preference``: AlpacaEval scale in [1, 2], the mean over ``n_judgments`` verdicts
    (2 = ``second`` wins). ``line``: the file line of the pair's first record.
    """

    file: str
    line: int
    prompt_id: str
    instruction: str
    model: str
    baseline: str
    first: str
    second: str
    preference: float
    n_judgments: int = 1

    @property
    def decided(self) -> bool:
        """The judge prefers one answer (the preference is not a tie)."""
        return self.preference != TIE


@dataclass
class PairFile:
    """Every pair of one file (ties included), and how many rows carried no verdict."""

    path: str
    pairs: list[Pair] = field(default_factory=list)
    n_records: int = 0
    n_no_verdict: int = 0

    @property
    def label(self) -> str:
        """Short name of the file: its name without ``.annotations.json`` / ``.jsonl``."""
        return re.sub(r"(\.annotations\.json|\.json|\.jsonl)$", "", Path(self.path).name)


def _texts(record: dict, annotation: bool) -> tuple[str, str, str]:
    """``(instruction, first answer, second answer)`` of one record."""
    names = ("output_1", "output_2") if annotation else ("output_baseline", "output_model")
    return tuple(winrate_load.text_field(record, name) for name in ("instruction", *names))


def load_pairs(path: str | Path) -> PairFile:
    """Read one file (a JSON array is AlpacaEval annotations, anything else judgment JSONL).

    Raises :class:`~cme_rewards.io.InputError` as ``FILE:LINE: field 'NAME': problem`` for a bad
    record, and for two records of one (prompt, model, baseline) whose answers differ.
    """
    path = Path(path)
    annotation, items = winrate_load.read_records(path)
    convert = (
        winrate_load.judgment_from_annotation if annotation else winrate_load.judgment_from_record
    )
    out = PairFile(path=str(path))
    merged: dict[tuple[str, str, str], tuple[Pair, float]] = {}
    for line, record in items:
        out.n_records += 1
        try:
            verdict = convert(record)
            instruction, first, second = _texts(record, annotation)
        except winrate_load.BadField as exc:
            raise InputError(f"{path}:{line}: {exc}") from None
        if not isinstance(verdict, winrate_load.Judgment):
            out.n_no_verdict += 1
            continue
        key = (verdict.prompt, verdict.model, verdict.baseline)
        if key in merged:
            pair, total = merged[key]
            for name, old, new in (
                ("output_baseline", pair.first, first),
                ("output_model", pair.second, second),
            ):
                if old != new:
                    raise InputError(
                        f"{path}:{line}: field '{name}': differs from line {pair.line}'s answer "
                        f"for the same (id, model, baseline)"
                    )
            merged[key] = (replace(pair, n_judgments=pair.n_judgments + 1), total + verdict.q)
            continue
        pair = Pair(
            file=str(path),
            line=line,
            prompt_id=verdict.prompt,
            instruction=instruction,
            model=verdict.model,
            baseline=verdict.baseline,
            first=first,
            second=second,
            preference=1.0 + verdict.q,
        )
        merged[key] = (pair, verdict.q)
    for pair, total in merged.values():
        out.pairs.append(replace(pair, preference=1.0 + total / pair.n_judgments))
    return out


def sample_prompts(files: Sequence[PairFile], n: int | None, seed: int) -> list[PairFile]:
    """Keep, in each file, the pairs of ``n`` prompts chosen by a seeded hash of the prompt id.

    The prompts are ranked by ``sha256(f"{seed}:{prompt_id}")``, so files over the same prompts
    keep the same ones, a larger ``n`` keeps a superset, and the choice does not depend on the other
    files. ``n=None`` keeps everything.
    """
    if n is None:
        return list(files)
    out = []
    for f in files:
        ids = sorted(
            {p.prompt_id for p in f.pairs},
            key=lambda pid: hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest(),
        )
        keep = set(ids[:n])
        out.append(replace(f, pairs=[p for p in f.pairs if p.prompt_id in keep]))
    return out
