"""Multi-turn and tool agent loops: score only the assistant's own tokens.

The assistant turns of ``responses`` come from veRL's ``response_mask``, else from the policy's
chat template (a turn runs to its end-of-turn token, an observation to the assistant header).
Each turn is scored after the conversation before it (observations as ``tool`` messages, or
``user`` where the verifier's template rejects ``tool``); :func:`combine_turns` merges the turns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any

from cme_rewards.formatting import GENERATOR_END_MARKERS, VerifierInput
from cme_rewards.options import ScorerOptions
from cme_rewards.results import CMEResult, finish_sample, floored

ROLE_LINES = ("user", "tool", "ipython", "observation", "function", "environment")
"""Role names a template writes as plain text before an observation (after its special marker)."""


@dataclass(frozen=True)
class Segment:
    """A run of response tokens: the assistant's own (``assistant``) or an observation."""

    assistant: bool
    ids: list[int]


def segments_from_mask(ids: Sequence[int], mask: Sequence[int]) -> list[Segment]:
    """Runs of ``ids`` by ``mask`` (1: assistant token, 0: observation), in order."""
    runs = groupby(zip(ids, mask, strict=True), key=lambda pair: bool(pair[1]))
    return [Segment(flag, [int(token) for token, _ in run]) for flag, run in runs]


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    """Ids that end an assistant turn: EOS and the common end-of-turn markers in the vocabulary."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(
        vocab[m] for m in GENERATOR_END_MARKERS if m in vocab and m not in ("<pad>", "<|pad|>")
    )
    return ids


def assistant_header_ids(tokenizer: Any) -> list[int]:
    """The ids the chat template adds for ``add_generation_prompt`` (e.g. ``<|im_start|>assistant\\n``)."""
    chat = [{"role": "user", "content": "x"}]
    without = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
    with_ = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    if not with_.startswith(without) or with_ == without:
        return []
    return tokenizer(with_[len(without) :], add_special_tokens=False)["input_ids"]


def segments_from_template(ids: Sequence[int], tokenizer: Any) -> list[Segment]:
    """Rebuild veRL's response mask from the policy's chat template (see the module docstring)."""
    ids = [int(t) for t in ids]
    ends = end_of_turn_ids(tokenizer)
    header = assistant_header_ids(tokenizer)
    k = len(header)
    out: list[Segment] = []
    i, n = 0, len(ids)
    while i < n:
        start = i
        while i < n and ids[i] not in ends:
            i += 1
        i = min(i + 1, n)  # the end-of-turn token is the assistant's own
        out.append(Segment(True, ids[start:i]))
        if i >= n:
            break
        start = i
        # the observation runs to the end of the next assistant header, else to the end
        headers = (j for j in range(i, n - k + 1) if ids[j : j + k] == header)
        i = next(headers, n - k) + k if header else n
        out.append(Segment(False, ids[start:i]))
    return out


def observation_text(tokenizer: Any, ids: list[int]) -> str:
    """An observation's text: decoded without special tokens, without the template's role lines."""
    lines = tokenizer.decode(ids, skip_special_tokens=True).strip().split("\n")
    while lines and lines[0].strip().lower() in ROLE_LINES:
        lines.pop(0)
    while lines and lines[-1].strip().lower() in ("assistant", "model"):
        lines.pop()
    return "\n".join(lines).strip()


def assistant_turns(
    ids: list[int], tokenizer: Any, mask: Sequence[int] | None = None
) -> list[tuple[bool, str]] | None:
    """``[(is_assistant, text)]`` of a multi-turn response; ``None`` for one assistant turn.

    The turns come from veRL's ``response_mask`` (``mask``), else from the chat template; their text
    is decoded with the policy tokenizer as a single-turn response is (:func:`observation_text`).
    """
    segments = (
        segments_from_template(ids, tokenizer) if mask is None else segments_from_mask(ids, mask)
    )
    if all(seg.assistant for seg in segments):
        return None
    out = []
    for seg in segments:
        if seg.assistant:
            out.append((True, tokenizer.decode(seg.ids, skip_special_tokens=True)))
        elif text := observation_text(tokenizer, seg.ids):
            out.append((False, text))
    return out


TEMPLATE_REJECTS = "the verifier's chat template rejects the prompt"


def turns_for_verifier(
    encode: Any, prompt: Any, turns: Sequence[tuple[bool, str]]
) -> list[tuple[Any, str]]:
    """``[(prompt_k, assistant text k)]``: each assistant turn after the conversation before it,
    observations as ``tool`` messages, or ``user`` messages where the verifier's chat template
    rejects the ``tool`` role (``encode(prompt, response)`` tells)."""

    def verifier_turns(tool_role: str) -> list[tuple[Any, str]]:
        history: list[dict[str, str]] = (
            [{"role": "user", "content": prompt}]
            if isinstance(prompt, str)
            else [dict(m) for m in prompt]
        )
        out: list[tuple[Any, str]] = []
        for assistant, text in turns:
            if assistant:
                out.append((list(history), text))
                history.append({"role": "assistant", "content": text})
            elif out:
                history.append({"role": tool_role, "content": text})
        return out

    pairs = verifier_turns("tool")
    if len(pairs) > 1:
        error = encode(*pairs[-1]).error
        if error is not None and error.startswith(TEMPLATE_REJECTS):
            pairs = verifier_turns("user")
    return pairs


def combine_turns(
    results: Sequence[CMEResult], options: ScorerOptions, *, id: str | None = None
) -> CMEResult:
    """One result of a conversation's assistant turns: token-weighted mean for ``mean`` / ``pmi``,
    sum for ``sum`` / ``pmi_sum``, else (``min_k``) over all turns' ``token_logprobs``.

    Empty turns (only an end-of-turn token) are skipped; any other unscorable turn floors the sample.
    """
    truncated = any(r.truncated for r in results)
    failed = [r.error for r in results if r.error is not None and r.error != "empty response"]
    if failed:
        return floored(f"assistant turn: {failed[0]}", options, id=id, truncated=truncated)
    scored = [r for r in results if r.error is None]
    if not scored:
        return floored("empty response", options, id=id, truncated=truncated)
    n = sum(r.n_tokens for r in scored)
    mean = options.reduction in ("mean", "pmi")
    if mean or options.reduction in ("sum", "pmi_sum"):
        value = sum(r.cme * r.n_tokens for r in scored) / n if mean else sum(r.cme for r in scored)
        return CMEResult(cme=value, n_tokens=n, truncated=truncated, error=None, id=id)
    logprobs = [lp for r in scored for lp in (r.token_logprobs or [])]
    if len(logprobs) != n:
        raise ValueError("combine_turns: reduction=min_k needs every turn's token_logprobs")
    inp = VerifierInput(input_ids=[0] * (n + 1), n_prompt=1, truncated=truncated)
    return finish_sample(inp, logprobs, options, id=id)
