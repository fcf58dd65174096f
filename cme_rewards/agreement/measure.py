"""Score every answer once per verifier, reduce the token log-probs to each reward variant and
control (``docs/agreement.md``), and measure their agreement with the judge on the same pairs.

Variants are :func:`~cme_rewards.reductions.reduce_token_logprobs` reductions (nats; ``pmi*`` add
the empty-prompt pass); ``ensemble`` averages the non-``random:`` verifiers' log-likelihood per
UTF-8 byte. Controls use the first verifier's tokens: ``longer``, ``shorter``, ``constant`` (the
second answer wins). A pair floored under any verifier is left out of its file's rows
(``n_excluded``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from cme_rewards.agreement.cache import ScoreCounts, Scored, score_texts
from cme_rewards.agreement.pairs import Pair, PairFile
from cme_rewards.agreement.stats import AgreementResult, agreement_stats
from cme_rewards.formatting import EMPTY_PROMPT
from cme_rewards.options import ScorerOptions
from cme_rewards.reductions import reduce_token_logprobs
from cme_rewards.verifier_names import strip_random
from cme_rewards.winrate.stats import Settings

VARIANTS = ("mean", "sum", "min_k", "pmi", "pmi_sum", "ensemble")
UNCONDITIONAL = ("pmi", "pmi_sum")
"""Variants that need the empty-prompt pass."""
CONTROLS = ("longer", "shorter", "constant")
CONTROL = "control"
"""The ``verifier`` of control rows."""


@dataclass(frozen=True)
class Row:
    """One (file, verifier, variant): its pairs, exclusions and figures."""

    file: str
    verifier: str
    variant: str
    n_excluded: int
    result: AgreementResult


@dataclass(frozen=True)
class FileSummary:
    """Counts of one file: records read, rows without verdict, ties, pairs measured (after the
    sample), the judge's share of wins for the second answer (percent), and comparisons."""

    file: str
    path: str
    n_records: int
    n_no_verdict: int
    n_ties: int
    n_pairs: int
    n_excluded: int
    second_wins: float
    comparisons: list[str]


@dataclass
class AgreementReport:
    """Everything one run measured: ``rows`` (verifier rows, then controls, per file) and
    ``files``; ``scoring`` counts texts scored now and taken from the cache."""

    rows: list[Row] = field(default_factory=list)
    files: list[FileSummary] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    scoring: ScoreCounts = field(default_factory=ScoreCounts)


def is_random(verifier: str) -> bool:
    """Whether ``verifier`` is a ``random:`` (random-weight) control."""
    return strip_random(verifier)[1]


def plan_variants(verifiers: Sequence[str], variants: Sequence[str] | None) -> list[str]:
    """The variants to measure: ``variants`` checked, or every one that applies (``ensemble`` needs
    two verifiers that are not ``random:``). Raises ``ValueError`` naming the problem."""
    real = [v for v in verifiers if not is_random(v)]
    if variants is None:
        return [v for v in VARIANTS if v != "ensemble" or len(real) >= 2]
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    if "ensemble" in variants and len(real) < 2:
        raise ValueError("variant ensemble needs at least two verifiers that are not random:")
    return list(dict.fromkeys(variants))


def _reward(
    cond: Scored, uncond: Scored | None, variant: str, options: ScorerOptions
) -> float | None:
    unconditional = None if uncond is None else uncond.token_logprobs
    if cond.token_logprobs is None or (variant in UNCONDITIONAL and unconditional is None):
        return None
    value, _ = reduce_token_logprobs(
        cond.token_logprobs,
        reduction=variant,
        min_tokens=options.min_tokens,
        min_k_percent=options.min_k_percent,
        unconditional=unconditional,
    )
    return value


def _answers(files: Sequence[PairFile]) -> list[tuple[str, str]]:
    """Unique (instruction, answer) of every decided pair, in first-seen order."""
    seen: dict[tuple[str, str], None] = {}
    for f in files:
        for p in f.pairs:
            if p.decided:
                seen.setdefault((p.instruction, p.first))
                seen.setdefault((p.instruction, p.second))
    return list(seen)


def measure(
    files: Sequence[PairFile],
    verifiers: Sequence[str],
    options: ScorerOptions,
    *,
    variants: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    settings: Settings | None = None,
    progress: bool = True,
) -> AgreementReport:
    """Score, reduce and measure: one :class:`Row` per file x verifier x variant, plus controls.

    ``options`` holds the scorer options shared by every verifier (its ``verifier`` is replaced by
    each name in turn); ``cache_dir`` keeps token log-probs between runs (``None``: no cache).
    """
    if not verifiers:
        raise ValueError("name at least one verifier")
    settings = settings or Settings(n_resamples=2000)
    plan = plan_variants(verifiers, variants)
    own = [v for v in plan if v != "ensemble"]
    answers = _answers(files)
    report = AgreementReport(
        settings={
            "verifiers": list(verifiers),
            "variants": plan,
            "confidence_level": settings.confidence_level,
            "n_resamples": settings.n_resamples,
            "bootstrap_seed": settings.seed,
            "dtype": options.dtype,
            "min_k_percent": options.min_k_percent,
            "min_tokens": options.min_tokens,
            "max_length": options.max_length,
        }
    )
    # rewards[(verifier, variant)][(instruction, answer)] -> reward or None (floored)
    rewards: dict[tuple[str, str], dict[tuple[str, str], float | None]] = {}
    n_tokens: dict[tuple[str, str], int] = {}
    per_byte: dict[str, dict[tuple[str, str], float | None]] = {}
    for vi, verifier in enumerate(verifiers):
        opts = options.replace(verifier=verifier)
        score = partial(
            score_texts, opts, cache_dir=cache_dir, progress=progress, counts=report.scoring
        )
        cond = score(answers, label="(given the prompt)")
        uncond: list[Scored | None] = [None] * len(answers)
        if any(v in UNCONDITIONAL for v in own):
            uncond = list(score([(EMPTY_PROMPT, a) for _, a in answers], label="(empty prompt)"))
        for variant in own:
            rewards[(verifier, variant)] = {
                key: _reward(c, u, variant, opts)
                for key, c, u in zip(answers, cond, uncond, strict=True)
            }
        if vi == 0:
            n_tokens = {key: c.n_tokens for key, c in zip(answers, cond, strict=True)}
        if not is_random(verifier):
            per_byte[verifier] = {
                key: None
                if c.token_logprobs is None or c.n_tokens < opts.min_tokens
                else float(c.token_logprobs.sum()) / max(1, len(key[1].encode("utf-8")))
                for key, c in zip(answers, cond, strict=True)
            }
    if "ensemble" in plan:
        name = "+".join(per_byte)
        rewards[(name, "ensemble")] = {
            key: None
            if any(pb[key] is None for pb in per_byte.values())
            else float(np.mean([pb[key] for pb in per_byte.values()]))
            for key in answers
        }
    for f in files:
        _measure_file(f, rewards, n_tokens, settings, report)
    return report


def _measure_file(
    f: PairFile,
    rewards: dict[tuple[str, str], dict[tuple[str, str], float | None]],
    n_tokens: dict[tuple[str, str], int],
    settings: Settings,
    report: AgreementReport,
) -> None:
    decided = [p for p in f.pairs if p.decided]

    def sides(p: Pair) -> tuple[tuple[str, str], tuple[str, str]]:
        return (p.instruction, p.first), (p.instruction, p.second)

    kept = [p for p in decided if all(r[s] is not None for r in rewards.values() for s in sides(p))]
    n_excluded = len(decided) - len(kept)
    pref = np.array([p.preference for p in kept])
    comparisons = sorted({f"{p.model} vs {p.baseline}" for p in f.pairs})
    report.files.append(
        FileSummary(
            file=f.label,
            path=f.path,
            n_records=f.n_records,
            n_no_verdict=f.n_no_verdict,
            n_ties=len(f.pairs) - len(decided),
            n_pairs=len(kept),
            n_excluded=n_excluded,
            second_wins=100.0 * float(np.mean(pref > 1.5)) if len(kept) else float("nan"),
            comparisons=comparisons,
        )
    )
    if not kept:
        return
    clusters = np.array([p.prompt_id for p in kept])
    comparison = np.array([f"{p.model}\0{p.baseline}" for p in kept])
    len_first, len_second = np.array([[n_tokens[s] for s in sides(p)] for p in kept], dtype=float).T
    ratio = len_second / np.maximum(len_first, 1.0)
    series = [
        (verifier, variant, np.array([values[sides(p)[1]] - values[sides(p)[0]] for p in kept]))
        for (verifier, variant), values in rewards.items()
    ]
    series += [
        (CONTROL, "longer", len_second - len_first),
        (CONTROL, "shorter", len_first - len_second),
        (CONTROL, "constant", np.ones(len(kept))),
    ]
    for verifier, variant, diff in series:
        result = agreement_stats(
            diff,
            pref,
            clusters,
            length_ratio=ratio,
            comparison=comparison,
            settings=settings,
            rng_names=(f.path, verifier, variant),
        )
        report.rows.append(Row(f.label, verifier, variant, n_excluded, result))
