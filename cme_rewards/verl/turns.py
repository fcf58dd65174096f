"""Multi-turn and tool agent loops: score only the assistant's own tokens.

veRL's agent loops put everything after the prompt into ``responses``: the assistant's generated
tokens and, between its turns, tool observations (and the chat template's turn markers). veRL marks
the generated tokens in ``response_mask`` (1 for LLM tokens, 0 for observations and padding), which
the reward manager gets on the colocated path (``RewardLoopManager.compute_rm_score``); on the
streaming path (``AgentLoopWorker._compute_score``, veRL's default) it gets the token ids without
the mask, and the mask is rebuilt here from the policy's chat template: an assistant turn runs to
its end-of-turn token, the observation after it runs to the template's assistant header
(``add_generation_prompt``), then the next assistant turn starts.

The conversation is then rebuilt for the verifier as chat messages: the prompt, then for each
assistant turn ``k`` the verifier scores turn ``k``'s text as the response to the prompt followed by
the earlier turns (``assistant`` messages) and observations (``tool`` messages, or ``user`` messages
for a verifier whose chat template rejects the ``tool`` role), each rendered with the verifier's own
chat template. :func:`combine_turns` makes one result of the turns' results: the token-weighted
mean for ``reduction=mean`` and ``pmi``, the sum for ``sum`` and ``pmi_sum``, and any other
reduction (``min_k``) over all turns' token log-probs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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
    out: list[Segment] = []
    for token, m in zip(ids, mask, strict=True):
        flag = bool(m)
        if out and out[-1].assistant == flag:
            out[-1].ids.append(int(token))
        else:
            out.append(Segment(flag, [int(token)]))
    return out


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
    ends = end_of_turn_ids(tokenizer)
    header = assistant_header_ids(tokenizer)
    out: list[Segment] = []
    i, n = 0, len(ids)
    while i < n:
        start = i
        while i < n and int(ids[i]) not in ends:
            i += 1
        i = min(i + 1, n)  # the end-of-turn token is the assistant's own
        out.append(Segment(True, [int(t) for t in ids[start:i]]))
        if i >= n:
            break
        start = i
        found = _find(ids, header, i) if header else -1
        if found < 0:  # no further assistant turn: the rest is observation (or padding)
            out.append(Segment(False, [int(t) for t in ids[i:]]))
            break
        i = found + len(header)
        out.append(Segment(False, [int(t) for t in ids[start:i]]))
    return out


def _find(ids: Sequence[int], needle: list[int], start: int) -> int:
    k = len(needle)
    for j in range(start, len(ids) - k + 1):
        if [int(t) for t in ids[j : j + k]] == needle:
            return j
    return -1


def observation_text(tokenizer: Any, ids: list[int]) -> str:
    """An observation's text: decoded without special tokens, without the template's role lines."""
    lines = tokenizer.decode(ids, skip_special_tokens=True).strip().split("\n")
    while lines and lines[0].strip().lower() in ROLE_LINES:
        lines.pop(0)
    while lines and lines[-1].strip().lower() in ("assistant", "model"):
        lines.pop()
    return "\n".join(lines).strip()


def conversation(segments: list[Segment], tokenizer: Any) -> list[tuple[bool, str]]:
    """``[(is_assistant, text)]`` of the segments, decoded with the policy tokenizer.

    Assistant text is decoded without special tokens, as a single-turn response is; observations
    lose the template's role lines too (:func:`observation_text`).
    """
    out = []
    for seg in segments:
        if seg.assistant:
            out.append((True, tokenizer.decode(seg.ids, skip_special_tokens=True)))
        elif text := observation_text(tokenizer, seg.ids):
            out.append((False, text))
    return out


def verifier_turns(
    prompt: Any, turns: Sequence[tuple[bool, str]], *, tool_role: str = "tool"
) -> list[tuple[Any, str]]:
    """``[(prompt_k, assistant text k)]``: each assistant turn with the conversation before it.

    ``prompt`` is the sample's prompt (chat messages, or text as one user message).
    """
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


TEMPLATE_REJECTS = "the verifier's chat template rejects the prompt"


def turns_for_verifier(
    encode: Any, prompt: Any, turns: Sequence[tuple[bool, str]]
) -> list[tuple[Any, str]]:
    """:func:`verifier_turns` with ``tool`` messages, or ``user`` messages where the verifier's
    chat template rejects the ``tool`` role (``encode(prompt, response)`` tells)."""
    pairs = verifier_turns(prompt, turns)
    if len(pairs) > 1:
        error = encode(*pairs[-1]).error
        if error is not None and error.startswith(TEMPLATE_REJECTS):
            pairs = verifier_turns(prompt, turns, tool_role="user")
    return pairs


def combine_turns(
    results: Sequence[CMEResult], options: ScorerOptions, *, id: str | None = None
) -> CMEResult:
    """One result from the results of a conversation's assistant turns (see the module docstring).

    Empty turns (a turn that is only an end-of-turn token) are skipped; any other turn that cannot
    be scored floors the whole sample with its error. ``token_logprobs`` are needed for ``min_k``.
    """
    truncated = any(r.truncated for r in results)
    failed = [r.error for r in results if r.error is not None and r.error != "empty response"]
    if failed:
        return floored(f"assistant turn: {failed[0]}", options, id=id, truncated=truncated)
    scored = [r for r in results if r.error is None]
    if not scored:
        return floored("empty response", options, id=id, truncated=truncated)
    n = sum(r.n_tokens for r in scored)
    if options.reduction in ("mean", "pmi"):
        # mean over all turns' tokens (for pmi: of conditional minus unconditional log-probs)
        value = sum(r.cme * r.n_tokens for r in scored) / n
        return CMEResult(cme=value, n_tokens=n, truncated=truncated, error=None, id=id)
    if options.reduction in ("sum", "pmi_sum"):  # sums over tokens: the turns' sums add up
        value = sum(r.cme for r in scored)
        return CMEResult(cme=value, n_tokens=n, truncated=truncated, error=None, id=id)
    logprobs = [lp for r in scored for lp in (r.token_logprobs or [])]
    if len(logprobs) != n:
        raise ValueError("combine_turns: reduction=min_k needs every turn's token_logprobs")
    inp = VerifierInput(input_ids=[0] * (n + 1), n_prompt=1, truncated=truncated)
    return finish_sample(inp, logprobs, options, id=id)
