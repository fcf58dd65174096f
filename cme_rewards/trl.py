"""CME as a reward function for TRL's ``GRPOTrainer(reward_funcs=...)``.

Plain callables (an ``nn.Module`` would be taken for a sequence classifier), logged under their
``__name__``: :class:`CMEReward`, :class:`AsyncCMEReward`, :class:`LengthPenalty`, and ``cme``
(a lazy ``CMEReward`` of the default verifier, for ``--reward_funcs cme_rewards.trl.cme``).
Of a conversational completion, the last assistant message is scored; messages before it (tool
calls and results) join the prompt as context.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .options import ScorerOptions
from .results import METRIC_PREFIX, CMEResult, batch_metrics
from .scorer import CMEScorer

Prompt = str | list[dict[str, Any]]
Completion = str | list[dict[str, Any]]


def _message_text(content: Any) -> str:
    """Text of a chat message's ``content``: a string, or the joined text blocks of a block list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(block.get("text", "") for block in content if block.get("type") == "text")


def _text_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with their content reduced to text (image blocks dropped)."""
    return [{**message, "content": _message_text(message.get("content"))} for message in messages]


def to_verifier_pair(prompt: Prompt, completion: Completion) -> tuple[Prompt, str]:
    """``(verifier prompt, response text)`` for one TRL prompt and completion.

    Standard format: both strings, passed through. Conversational format: the response is the text
    of the completion's last assistant message; the completion's earlier messages (tool calls and
    tool results) are appended to the prompt messages. A completion with no assistant text gives an
    empty response, which the scorer floors.
    """
    if isinstance(completion, str):
        return (prompt if isinstance(prompt, str) else _text_messages(prompt)), completion
    messages = _text_messages(completion)
    assistant = [i for i, message in enumerate(messages) if message.get("role") == "assistant"]
    user = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    context = _text_messages(user)
    if not assistant:
        return context, ""
    return context + messages[: assistant[-1]], messages[assistant[-1]]["content"]


def _resolve_device(device: str) -> str:
    """``"auto"`` under a multi-process launch (``LOCAL_RANK`` set) with CUDA -> ``cuda:<LOCAL_RANK>``."""
    if device == "auto" and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


class _CMERewardBase:
    """Shared state and scoring of the sync and async CME reward callables."""

    def __init__(
        self,
        verifier: str | None = None,
        *,
        scorer: CMEScorer | None = None,
        name: str = "cme",
        lazy: bool = False,
        **scorer_options: Any,
    ) -> None:
        """Args:
        verifier, **scorer_options: :class:`ScorerOptions` fields (a bad one raises
            :class:`OptionError`); ``device="auto"`` picks ``cuda:$LOCAL_RANK`` under a launcher.
        scorer: an existing ``CMEScorer`` to share instead (no other is built).
        name: what TRL logs under (``rewards/<name>/mean``); prefix of the columns logged here.
        lazy: load the verifier on the first call (options are checked now).
        """
        if scorer is not None and (scorer_options or verifier):
            raise TypeError("pass either scorer= or a verifier and its options, not both")
        if verifier is not None:
            scorer_options["verifier"] = verifier
        self.__name__ = name
        self._scorer = scorer
        self.options = (
            scorer.options if scorer is not None else ScorerOptions.from_kwargs(**scorer_options)
        )
        self.options = self.options.replace(device=_resolve_device(self.options.device))
        self.verifier = scorer.verifier_name if scorer is not None else self.options.verifier
        self._build_lock = threading.Lock()
        self.last_results: list[CMEResult] = []
        """Results of the latest call, in completion order (for inspection and tests)."""
        if not lazy and scorer is None:
            self._scorer = CMEScorer(options=self.options)

    @property
    def scorer(self) -> CMEScorer:
        """The ``CMEScorer`` in use (built now if construction was lazy)."""
        with self._build_lock:
            if self._scorer is None:
                self._scorer = CMEScorer(options=self.options)
            return self._scorer

    def _score(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[Completion],
        ids: Sequence[Any] | None,
    ) -> list[CMEResult]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        pairs = [to_verifier_pair(p, c) for p, c in zip(prompts, completions, strict=True)]
        return self.scorer.score(
            [p for p, _ in pairs],
            [r for _, r in pairs],
            ids=None if ids is None else [str(i) for i in ids],
            groups=[json.dumps(p, sort_keys=True, default=str) for p in prompts],
        )

    def _finish(
        self,
        results: list[CMEResult],
        log_extra: Callable[[str, list], None] | None,
        log_metric: Callable[[str, float], None] | None,
    ) -> list[float]:
        """Record, log through TRL's hooks when given, and return the rewards (nats)."""
        self.last_results = results
        name = self.__name__
        if log_extra is not None:
            log_extra(f"{name}/n_tokens", [r.n_tokens for r in results])
            log_extra(f"{name}/truncated", [r.truncated for r in results])
            log_extra(f"{name}/error", [r.error for r in results])
        if log_metric is not None:
            for key, value in batch_metrics(results).items():
                log_metric(name + "/" + key.removeprefix(METRIC_PREFIX), value)
        return [r.cme for r in results]

    def __repr__(self) -> str:
        state = "loaded" if self._scorer is not None else "not loaded"
        return f"{type(self).__name__}(name={self.__name__!r}, verifier={self.verifier!r}, {state})"


class CMEReward(_CMERewardBase):
    """Synchronous CME reward for ``GRPOTrainer(reward_funcs=...)``.

    Example::

        reward = CMEReward("gemma3-270m", max_length=4096)
        trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=config, train_dataset=ds)

    Returns one reward (nats) per completion, never ``None`` or NaN. The completions of one prompt
    form a group: one that cannot be scored gets the worst scored member's reward minus
    ``floor_margin`` (the fixed ``floor`` when none was scored). An ``id`` dataset column names
    samples in warnings. Logs ``<name>/n_tokens``, ``<name>/truncated``, ``<name>/error`` per
    completion (``log_extra``) and :func:`cme_rewards.results.batch_metrics` per call
    (``log_metric``), with ``<name>/`` in place of ``cme/``.
    """

    def __call__(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[Completion],
        *,
        id: Sequence[Any] | None = None,  # noqa: A002 - TRL passes dataset columns by their name
        log_extra: Callable[[str, list], None] | None = None,
        log_metric: Callable[[str, float], None] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        return self._finish(self._score(prompts, completions, id), log_extra, log_metric)


class AsyncCMEReward(_CMERewardBase):
    """``CMEReward`` with ``async def __call__``: TRL awaits it alongside other async rewards.

    Scoring runs in a worker thread (``asyncio.to_thread``), so the event loop stays free; the
    scorer's own lock serialises forward passes on one verifier.
    """

    async def __call__(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[Completion],
        *,
        id: Sequence[Any] | None = None,  # noqa: A002 - TRL passes dataset columns by their name
        log_extra: Callable[[str, list], None] | None = None,
        log_metric: Callable[[str, float], None] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        results = await asyncio.to_thread(self._score, prompts, completions, id)
        return self._finish(results, log_extra, log_metric)


class LengthPenalty:
    """Reward ``-len(completion_ids) / max_tokens`` (policy tokens), in ``[-1, 0]`` for
    completions up to ``max_tokens``.

    Maximising CME drifts response length (a mean log-likelihood depends on the length); combine
    the two with ``GRPOConfig(reward_weights=[1.0, w])`` to counter it.
    """

    def __init__(self, max_tokens: int, *, name: str = "length_penalty") -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.max_tokens = max_tokens
        self.__name__ = name

    def __call__(self, completion_ids: Sequence[Sequence[int]], **kwargs: Any) -> list[float]:
        return [-len(ids) / self.max_tokens for ids in completion_ids]


cme = CMEReward(lazy=True)
"""CME under the default verifier (SmolLM2-135M-Instruct), loaded on first call; for
``trl grpo --reward_funcs cme_rewards.trl.cme``."""
