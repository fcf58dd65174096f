"""Judge backends: an OpenAI-compatible chat-completions server, and a local transformers model.

Both turn a :class:`~cme_rewards.judge.pairs.Task` into a :class:`Verdict` expressed for the
model (``winner`` in model / baseline / tie; ``preference`` in [1, 2], 2 = model wins).
"""

from __future__ import annotations

import asyncio
import math
import os
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from cme_rewards.judge.pairs import Task
from cme_rewards.judge.prompt import LABELS, REMINDER, VERDICT_PREFIX, build_messages, parse_verdict


class JudgeUnavailableError(RuntimeError):
    """The judge cannot be reached or loaded; the message names the option to fix."""


@dataclass
class Verdict:
    """A judge's decision on one task, in terms of the model (not of A/B)."""

    winner: str | None  # "model" | "baseline" | "tie"; None with error
    preference: float | None = None  # continuous, [1, 2]; local backend only
    error: str | None = None
    raw: str | None = None  # the judge's reply (server) or verdict-token probabilities (local)
    attempts: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


def label_to_winner(label: str, order: str) -> str:
    """Map the judge's A/B/TIE label to model/baseline/tie for a presentation order."""
    if label == "TIE":
        return "tie"
    return "model" if (label == "A") == (order == "model_first") else "baseline"


class OpenAIJudge:
    """Any OpenAI-compatible ``/v1/chat/completions`` server (OpenAI, vLLM, ``transformers serve``).

    Transport errors, timeouts, 429 and 5xx are retried by the ``openai`` client with exponential
    backoff (``max_retries``, ``timeout`` seconds per request); an unparseable verdict is asked
    again (``verdict_retries`` times, with a reminder of the format) and then recorded as an error.
    ``concurrency`` bounds the requests in flight.
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        concurrency: int = 4,
        timeout: float = 60.0,
        max_retries: int = 3,
        verdict_retries: int = 2,
        max_tokens: int = 16,
        temperature: float = 0.0,
    ):
        from openai import AsyncOpenAI

        self.model = self.name = model
        self.concurrency = max(1, concurrency)
        self.verdict_retries = verdict_retries
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.client = AsyncOpenAI(
            base_url=self.base_url, api_key=api_key, timeout=timeout, max_retries=max_retries
        )

    async def check(self) -> None:
        """Fail early, naming ``--base-url``, when the server cannot be reached."""
        import openai

        try:
            await self.client.models.list()
        except openai.APIConnectionError as exc:
            raise JudgeUnavailableError(
                f"cannot reach the judge server at --base-url {self.base_url or '(OpenAI default)'}: {exc}"
            ) from None
        except openai.APIStatusError as exc:
            if exc.status_code in (401, 403):
                raise JudgeUnavailableError(
                    f"the judge server at --base-url {self.base_url} refused the key "
                    f"(--api-key / OPENAI_API_KEY): {exc.status_code}"
                ) from None
            # Servers without /v1/models are fine; chat completions are what we use.

    async def __call__(self, task: Task) -> Verdict:
        import openai

        messages: list[dict[str, str]] = build_messages(task.pair.instruction, *task.answers)
        transient = (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError)
        replies: list[str] = []
        for attempt in range(1, self.verdict_retries + 2):
            try:
                response = await self.client.chat.completions.create(
                    model=self.model,
                    messages=messages,
                    max_tokens=self.max_tokens,
                    temperature=self.temperature,
                )
            except openai.BadRequestError as exc:  # e.g. context too long: this pair only
                return Verdict(None, error=f"request rejected: {exc}", attempts=attempt)
            except transient as exc:
                raise JudgeUnavailableError(
                    f"the judge server at --base-url {self.base_url} failed after "
                    f"{self.client.max_retries} retries ({exc}); rerun the same command to resume"
                ) from None
            text = response.choices[0].message.content or ""
            replies.append(text)
            label = parse_verdict(text)
            if label is not None:
                return Verdict(label_to_winner(label, task.order), raw=text, attempts=attempt)
            messages = [
                *messages,
                {"role": "assistant", "content": text},
                {"role": "user", "content": REMINDER},
            ]
        return Verdict(
            None,
            error=f"unparseable verdict after {len(replies)} attempts",
            raw=replies[-1] if replies else None,
            attempts=len(replies),
        )


class LocalJudge:
    """A transformers causal LM read as a weighted judge (like AlpacaEval's weighted GPT-4 judge).

    The prompt is the judge messages under the model's chat template (generation prompt added),
    followed by ``WINNER:``; the next-token distribution gives ``p(A), p(B), p(TIE)`` (each summed
    over the first token of the label with and without a leading space), renormalised over the three.
    ``preference = 1 + p(model) + p(tie) / 2`` and ``winner`` is the most likely label. ``raw``
    keeps the three probabilities and ``verdict_mass`` (their unnormalised sum: low mass means the
    model is not following the format). Each answer and the instruction are cut to
    ``max_text_tokens`` tokens, so a pair fits the context and CPU runs stay affordable.
    """

    def __init__(
        self,
        verifier: str | None = None,
        *,
        model=None,
        tokenizer=None,
        name: str | None = None,
        device: str = "cpu",
        max_text_tokens: int = 512,
        seed: int = 0,
    ):
        if model is None or tokenizer is None:
            if verifier is None:
                raise ValueError("LocalJudge needs a verifier name or a model and tokenizer")
            from cme_rewards.models import load_verifier

            model, tokenizer = load_verifier(verifier, device=device, seed=seed)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name or verifier or type(model).__name__
        self.max_text_tokens = max_text_tokens
        self.concurrency = 1
        self._label_ids = self._verdict_token_ids()

    def _verdict_token_ids(self) -> dict[str, list[int]]:
        encode = partial(self.tokenizer.encode, add_special_tokens=False)
        ids = {
            label: sorted({toks[0] for toks in (encode(label), encode(" " + label)) if toks})
            for label in LABELS
        }
        seen: dict[int, str] = {}
        for label, toks in ids.items():
            for t in toks:
                if t in seen:
                    raise ValueError(
                        f"verdict labels {seen[t]!r} and {label!r} share the first token {t}; "
                        "this tokenizer cannot be used as a local judge"
                    )
                seen[t] = label
        return ids

    def _cut(self, text: str) -> str:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) <= self.max_text_tokens:
            return text
        return self.tokenizer.decode(ids[: self.max_text_tokens]) + " [...]"

    def prompt_ids(self, task: Task) -> list[int]:
        """Token ids of the judge prompt ending in ``WINNER:``."""
        messages = build_messages(*map(self._cut, (task.pair.instruction, *task.answers)))
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            return self.tokenizer.encode(text + VERDICT_PREFIX, add_special_tokens=False)
        text = "\n\n".join(m["content"] for m in messages) + "\n\n" + VERDICT_PREFIX
        return self.tokenizer.encode(text)

    def verdict(self, task: Task) -> Verdict:
        import torch

        ids = self.prompt_ids(task)
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            logits = self.model(torch.tensor([ids], device=device)).logits[0, -1].float()
        probs = torch.softmax(logits.double(), dim=-1)
        p = {label: float(probs[toks].sum()) for label, toks in self._label_ids.items()}
        mass = sum(p.values())
        if not math.isfinite(mass) or mass <= 0.0:
            return Verdict(None, error="verdict tokens have no probability", raw=str(p))
        p = {k: v / mass for k, v in p.items()}
        p_model = p["A"] if task.order == "model_first" else p["B"]
        preference = 1.0 + p_model + 0.5 * p["TIE"]
        label = max(p, key=p.get)
        return Verdict(
            label_to_winner(label, task.order),
            preference=min(2.0, max(1.0, preference)),
            raw=f"p(A)={p['A']:.6g} p(B)={p['B']:.6g} p(TIE)={p['TIE']:.6g}",
            extra={"verdict_mass": mass, "prompt_tokens": len(ids)},
        )

    async def check(self) -> None:
        return None

    async def __call__(self, task: Task) -> Verdict:
        return await asyncio.to_thread(self.verdict, task)
