"""OpenRLHF's reward protocol: recover what the verifier must see, and build the reply.

OpenRLHF (0.11.2, ``openrlhf/utils/agent.py``) sends per sample ``query`` (templated prompt +
response, special tokens kept), ``prompt`` (the templated prompt) and ``label`` (the
``--data.label_key`` column, ``""`` without one). The response is ``query`` minus ``prompt``,
without the policy's special tokens. The verifier's prompt is ``label`` when it holds the raw
instruction (text or chat messages), else ``prompt`` stripped of the policy's chat template (needs
the policy tokenizer), else ``prompt`` as it is.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cme_rewards.batched_scorer import Sample
from cme_rewards.formatting import GENERATOR_END_MARKERS, clean_response, is_text
from cme_rewards.options import CheckedOptions, ScorerOptions, option
from cme_rewards.results import METRIC_PREFIX, CMEResult, floored

logger = logging.getLogger(__name__)

PROMPT_SOURCES = ("auto", "label", "template", "templated")
"""``auto``: label, else template stripping, else as is; or force one of the three."""

UNRECOVERED = "unrecovered"
"""Prompt source counted for samples whose prompt recovery raised."""

MIN_PROMPT_OVERLAP = 16
"""Characters of the prompt's end that must start ``query`` when OpenRLHF cut the prompt's left."""

COMMON_SPECIAL_TOKENS = (
    *GENERATOR_END_MARKERS,
    "<|im_start|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<start_of_turn>",
    "<bos>",
    "<s>",
)
"""Special tokens removed from responses when no policy tokenizer is given."""


@dataclass(frozen=True)
class RecoveryOptions(CheckedOptions):
    """How OpenRLHF's samples are turned back into the verifier's prompt and response."""

    policy_tokenizer: str | None = option(
        None,
        "the policy's tokenizer (name, folder or hub id): strips its chat template and special tokens",
    )
    prompt_source: str = option(
        "auto",
        "auto: the label (raw prompt), else the prompt stripped of the policy template, else as "
        "is; or force label, template or templated",
        choices=PROMPT_SOURCES,
    )

    def build(self) -> PromptRecovery:
        """The :class:`PromptRecovery` these options describe, its start-up warning logged; loads
        the policy tokenizer, named the way a verifier is (built-in, ``.gguf``, folder, hub id)."""
        from transformers import AutoTokenizer

        from cme_rewards.models import resolve_verifier

        name = self.policy_tokenizer
        tokenizer = AutoTokenizer.from_pretrained(resolve_verifier(name)) if name else None
        recovery = PromptRecovery(tokenizer, self.prompt_source)
        if (warning := recovery.startup_warning()) is not None:
            logger.warning("%s", warning)
        return recovery


@dataclass(frozen=True)
class Recovered:
    """One OpenRLHF sample as the verifier sees it; ``source`` of ``prompt``: ``label``,
    ``template`` or ``templated``; ``error``: why it cannot be scored (it gets the floor)."""

    prompt: str | list[dict[str, Any]]
    response: str
    source: str
    error: str | None = None


def policy_special_tokens(tokenizer: Any) -> tuple[str, ...]:
    """Every special token string of a (policy) tokenizer, longest first."""
    tokens = set(getattr(tokenizer, "all_special_tokens", ()))
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens.update(t.content for t in decoder.values() if getattr(t, "special", False))
    return tuple(sorted((t for t in tokens if t), key=len, reverse=True))


class ChatTemplateStripper:
    """Recovers the messages a policy's chat template rendered into a prompt string.

    The template rendered with placeholders (a user turn; system + user) splits into fixed pieces;
    a prompt made of them gives back the text between (linear time). A lone user turn comes back
    as its text, otherwise as chat messages.
    """

    _HOLE = "\x00CME{}\x00"
    _SHAPES = (("user",), ("system", "user"))

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("policy tokenizer: it has no chat template to strip")
        self.shapes: list[tuple[tuple[str, ...], list[str]]] = []
        for roles in self._SHAPES:
            messages = [{"role": r, "content": self._HOLE.format(i)} for i, r in enumerate(roles)]
            try:
                text = tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
            except Exception:  # e.g. a template that rejects the system role
                continue
            pieces = [text]
            for i in range(len(roles)):
                head, hole, tail = pieces[-1].partition(self._HOLE.format(i))
                if not hole or self._HOLE.format(i) in tail:
                    break  # the template drops or repeats a content: no usable shape
                pieces[-1:] = [head, tail]
            else:
                self.shapes.append((roles, pieces))
        if not self.shapes:
            raise ValueError("policy tokenizer: its chat template does not render a user turn")

    def unwrap(self, templated: str) -> str | list[dict[str, Any]] | None:
        """The instruction (or messages) rendered into ``templated``, or ``None`` if none match."""
        for roles, pieces in self.shapes:
            first, *inner, last = pieces
            if len(templated) < sum(map(len, pieces)):
                continue
            if not (templated.startswith(first) and templated.endswith(last)):
                continue
            middle = templated[len(first) : len(templated) - len(last)]
            contents = []
            for piece in inner:
                content, found, middle = middle.partition(piece)
                if not found:
                    break
                contents.append(content)
            else:
                contents.append(middle)
                if roles == ("user",):
                    return contents[0]
                return [{"role": r, "content": c} for r, c in zip(roles, contents, strict=True)]
        return None


def longest_overlap(prompt: str, query: str, minimum: int = MIN_PROMPT_OVERLAP) -> int:
    """The longest ``k >= minimum`` with ``prompt[-k:] == query[:k]`` and ``k < len(prompt)``, else 0.

    Linear time (a few ``str.find`` candidates, then KMP), so a hostile prompt cannot make it slow.
    """
    n = len(prompt)
    if n - 1 < minimum or len(query) < minimum:
        return 0
    head = query[:minimum]
    pos = prompt.find(head, 1)
    for _ in range(8):
        if pos == -1:
            return 0
        if query.startswith(prompt[pos:]):
            return n - pos
        pos = prompt.find(head, pos + 1)
    pattern, text = query[: n - 1], prompt[1:]
    failure = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[k] != pattern[i]:
            k = failure[k - 1]
        if pattern[k] == pattern[i]:
            k += 1
        failure[i] = k
    k = 0
    for c in text:
        while k and (k == len(pattern) or pattern[k] != c):
            k = failure[k - 1]
        if k < len(pattern) and pattern[k] == c:
            k += 1
    return k if k >= minimum else 0


def split_query(query: str, prompt: str, policy_tokenizer: Any = None) -> str | None:
    """What follows ``prompt`` in ``query`` (also after a decode round trip through the policy
    tokenizer, or when OpenRLHF cut the prompt's left: :func:`longest_overlap`), else ``None``."""
    if query.startswith(prompt):
        return query[len(prompt) :]
    if policy_tokenizer is not None:
        ids = policy_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        decoded = policy_tokenizer.decode(ids, skip_special_tokens=False)
        if query.startswith(decoded):
            return query[len(decoded) :]
    k = longest_overlap(prompt, query)
    return query[k:] if k else None


def _label_prompt(label: Any) -> str | list[dict[str, Any]] | None:
    """``label`` as a verifier prompt, if it is a non-empty string or a list of chat messages."""
    if isinstance(label, str):
        return label if label.strip() else None
    if (
        isinstance(label, list)
        and label
        and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in label
        )
    ):
        return label
    return None


class PromptRecovery:
    """Turns OpenRLHF's ``(query, prompt, label)`` into the verifier's ``(prompt, response)``,
    using the policy tokenizer's special tokens and chat template when given."""

    def __init__(self, policy_tokenizer: Any = None, prompt_source: str = "auto") -> None:
        if prompt_source not in PROMPT_SOURCES:
            raise ValueError(
                f"prompt_source: must be one of {PROMPT_SOURCES}, got {prompt_source!r}"
            )
        self.policy_tokenizer = policy_tokenizer
        self.prompt_source = prompt_source
        self.special_tokens = (
            policy_special_tokens(policy_tokenizer)
            if policy_tokenizer is not None
            else COMMON_SPECIAL_TOKENS
        )
        self.stripper: ChatTemplateStripper | None = None
        if policy_tokenizer is not None and getattr(policy_tokenizer, "chat_template", None):
            self.stripper = ChatTemplateStripper(policy_tokenizer)
        if prompt_source == "template" and self.stripper is None:
            raise ValueError(
                "prompt_source 'template' needs a policy tokenizer with a chat template"
            )
        self._warned_unmatched = False

    def startup_warning(self) -> str | None:
        """What to warn about at start-up: the verifier may see the policy's template."""
        if self.prompt_source in ("auto", "label") and self.stripper is None:
            return (
                "no policy tokenizer with a chat template: samples whose label is not the raw prompt "
                "are scored with the policy's templated prompt as it is (set --data.label_key to the "
                "raw prompt column, or name the policy tokenizer)"
            )
        if self.prompt_source == "templated":
            return "prompt source 'templated': the verifier sees the policy's templated prompt as it is"
        return None

    def recover(self, query: str, prompt: str, label: Any = None) -> Recovered:
        """The verifier's view of one OpenRLHF sample (never raises for bad sample content)."""
        for name, text in (("prompt", prompt), ("query", query)):
            if not is_text(text):  # a lone surrogate: no tokenizer takes it
                return Recovered(prompt, "", "templated", error=f"undecodable text in {name}")
        tail = split_query(query, prompt, self.policy_tokenizer)
        source, verifier_prompt = self._prompt(prompt, label)
        if tail is None:
            return Recovered(
                verifier_prompt, "", source, error="query does not start with the prompt"
            )
        return Recovered(verifier_prompt, clean_response(tail, self.special_tokens), source)

    def samples(
        self,
        queries: Sequence[str],
        prompts: Sequence[str],
        labels: Sequence[Any],
        options: ScorerOptions,
        sources: Counter[str] | None = None,
    ) -> list[Sample | CMEResult]:
        """Each sample for the verifier, or its floor result when it cannot be recovered (even if
        :meth:`recover` raises); ``sources`` counts where the prompts came from."""
        items: list[Sample | CMEResult] = []
        for query, prompt, label in zip(queries, prompts, labels, strict=True):
            try:
                rec = self.recover(query, prompt, label)
            except Exception as exc:  # e.g. a tokenizer refusing a lone surrogate
                error = f"prompt recovery failed: {type(exc).__name__}: {exc}"[:300]
                error = error if is_text(prompt) else "undecodable text in prompt"
                rec = Recovered(prompt, "", UNRECOVERED, error)
            if sources is not None:
                sources[rec.source] += 1
            ok = rec.error is None
            items.append(Sample(rec.prompt, rec.response) if ok else floored(rec.error, options))
        return items

    def _prompt(self, prompt: str, label: Any) -> tuple[str, str | list[dict[str, Any]]]:
        if self.prompt_source in ("auto", "label"):
            from_label = _label_prompt(label)
            if from_label is not None:
                return "label", from_label
        if self.prompt_source in ("auto", "label", "template") and self.stripper is not None:
            stripped = self.stripper.unwrap(prompt)
            if stripped is not None:
                return "template", stripped
            if not self._warned_unmatched:
                self._warned_unmatched = True
                logger.warning(
                    "a prompt does not match the policy's chat template; scoring it as it is "
                    "(warned once): %r",
                    prompt[:200],
                )
        return "templated", prompt


def openrlhf_reply(results: Sequence[CMEResult]) -> dict[str, Any]:
    """The JSON OpenRLHF expects: ``rewards``, ``scores``, numeric ``extra_logs`` (it makes tensors
    of them), and ``results`` (the shared output fields with the error texts; OpenRLHF ignores it)."""
    rewards = [float(r.cme) for r in results]
    return {
        "rewards": rewards,
        "scores": rewards,
        "extra_logs": extra_logs(results),
        "results": [r.to_dict() for r in results],
    }


EXTRA_LOG_KEYS = (
    f"{METRIC_PREFIX}mean",
    f"{METRIC_PREFIX}floored_frac",
    f"{METRIC_PREFIX}truncated_frac",
    f"{METRIC_PREFIX}n_tokens_mean",
)
"""Per-sample ``extra_logs`` keys, named as :func:`cme_rewards.results.batch_metrics` names them.

OpenRLHF 0.11.2 averages each key over a step's samples (``PPOActor.training_step``), so the step
figure equals ``batch_metrics``' for ``floored_frac`` (1 for a floored sample), ``truncated_frac``
and ``n_tokens_mean``; ``cme/mean`` also counts floored samples at their floor. ``std``, ``min``
and ``max`` cannot pass through that averaging. The ``cme/`` prefix clobbers no OpenRLHF metric.
"""


def extra_logs(results: Sequence[CMEResult]) -> dict[str, list[float]]:
    """Numeric per-sample logs under :data:`EXTRA_LOG_KEYS` (see there for what each means)."""
    mean, floored, truncated, n_tokens = EXTRA_LOG_KEYS
    return {
        mean: [float(r.cme) for r in results],
        floored: [float(r.error is not None) for r in results],
        truncated: [float(r.truncated) for r in results],
        n_tokens: [float(r.n_tokens) for r in results],
    }
