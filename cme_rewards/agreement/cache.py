"""Token log-probs of (prompt, answer) texts under one verifier, scored once and kept on disk.

One JSONL file per verifier and set of options that change log-probs (:func:`fingerprint`), one
line per scored text: ``{"key", "lp", "truncated", "error"}``, where ``key`` hashes the prompt and
the answer and ``lp`` holds the answer's token log-probs (nats, one per scored verifier token; null
when the answer got the floor). Lines are appended after every chunk, so an interrupted run keeps
what it scored and a rerun scores only what is missing; a torn last line is ignored.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cme_rewards.formatting import Prompt
from cme_rewards.options import ScorerOptions

FORMAT = 1
CHUNK = 32
"""Answers scored per call to the scorer between two cache writes."""


@dataclass(frozen=True)
class Scored:
    """One answer's verifier pass: ``token_logprobs`` ``[n_tokens]`` (nats), or ``None`` with
    ``error`` set when the scorer gave it the floor."""

    token_logprobs: np.ndarray | None
    truncated: bool
    error: str | None

    @property
    def n_tokens(self) -> int:
        return 0 if self.token_logprobs is None else len(self.token_logprobs)

    @classmethod
    def of(cls, token_logprobs: Any, truncated: bool, error: str | None) -> Scored:
        """From a list or array of log-probs (or ``None``), kept as float64."""
        lp = None if token_logprobs is None else np.asarray(token_logprobs, dtype=np.float64)
        return cls(lp, bool(truncated), error)


def fingerprint(options: ScorerOptions) -> dict[str, Any]:
    """The options that change token log-probs, with ``auto`` device and dtype resolved here.

    Reduction, floor and ``min_tokens`` are applied after the cache, so they are not part of it.
    """
    from cme_rewards.models import resolve_device, resolve_dtype
    from cme_rewards.verifier_names import strip_random

    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    return {
        "format": FORMAT,
        "verifier": options.verifier,
        "seed": options.seed if strip_random(options.verifier)[1] else None,
        "device": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "max_length": options.max_length,
        "score_eos": options.score_eos,
        "prompt_template": options.prompt_template,
        "chat_template": options.chat_template,
        "strip_special_tokens": list(options.strip_special_tokens),
    }


def text_key(prompt: Prompt, response: str) -> str:
    """Hash of one (prompt, answer): the cache key."""
    return hashlib.sha256(json.dumps([prompt, response], ensure_ascii=False).encode()).hexdigest()


class TokenCache:
    """The cache file of one verifier + options under ``directory`` (``None``: memory only)."""

    def __init__(self, directory: str | Path | None, options: ScorerOptions) -> None:
        fp = fingerprint(options)
        digest = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", options.verifier)[-60:]
        self.path = None if directory is None else Path(directory) / f"{slug}-{digest}.jsonl"
        self.entries: dict[str, Scored] = {}
        if self.path is not None and self.path.exists():
            for raw in self.path.read_bytes().splitlines():
                try:
                    rec = json.loads(raw)
                    self.entries[rec["key"]] = Scored.of(rec["lp"], rec["truncated"], rec["error"])
                except (ValueError, KeyError, TypeError):
                    continue  # a torn line from an interrupted run: scored again

    def put(self, items: dict[str, Scored]) -> None:
        """Keep ``items`` and append them to the file."""
        self.entries.update(items)
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        for key, s in items.items():
            lp = None if s.token_logprobs is None else s.token_logprobs.tolist()
            record = {"key": key, "lp": lp, "truncated": s.truncated, "error": s.error}
            lines.append(json.dumps(record) + "\n")
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write("".join(lines))


@dataclass
class ScoreCounts:
    """How many texts a call scored and how many came from the cache."""

    scored: int = 0
    cached: int = 0


def score_texts(
    options: ScorerOptions,
    requests: Sequence[tuple[Prompt, str]],
    *,
    cache_dir: str | Path | None,
    progress: bool = True,
    counts: ScoreCounts | None = None,
    label: str = "",
) -> list[Scored]:
    """Token log-probs of each ``(prompt, answer)`` under ``options.verifier``, in input order.

    Texts already in the cache are not scored again; the verifier loads only when something is
    missing, scores the rest longest first in chunks of :data:`CHUNK`, and each chunk is written to
    the cache as soon as it is done.
    """
    from tqdm.auto import tqdm

    cache = TokenCache(cache_dir, options)
    keys = [text_key(p, r) for p, r in requests]
    todo = {key: req for key, req in zip(keys, requests, strict=True) if key not in cache.entries}
    if counts is not None:
        counts.cached += len(set(keys)) - len(todo)
        counts.scored += len(todo)
    if todo:
        from cme_rewards.scorer import CMEScorer

        scorer = CMEScorer(options=options.replace(reduction="mean", min_tokens=1))
        order = sorted(todo, key=lambda k: len(todo[k][1]), reverse=True)
        desc = f"{options.verifier} {label}".strip()
        # A floored answer is left out of its pair and counted (n_excluded), not logged one by one.
        logger = logging.getLogger("cme_rewards")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            with tqdm(total=len(order), desc=desc, unit="answer", disable=not progress) as bar:
                for start in range(0, len(order), CHUNK):
                    chunk = order[start : start + CHUNK]
                    results = scorer.score(
                        [todo[k][0] for k in chunk],
                        [todo[k][1] for k in chunk],
                        return_token_logprobs=True,
                        progress=False,
                    )
                    cache.put(
                        {
                            k: Scored.of(r.token_logprobs, r.truncated, r.error)
                            for k, r in zip(chunk, results, strict=True)
                        }
                    )
                    bar.update(len(chunk))
        finally:
            logger.setLevel(level)
            del scorer
            gc.collect()
    return [cache.entries[k] for k in keys]
