"""What the verifier sees: its own prompt format, then the response re-tokenized with its tokenizer.

Rules:
- The prompt is rendered with the verifier's chat template (``add_generation_prompt=True``) when it
  has one (or one is passed), else with ``PLAIN_PROMPT_TEMPLATE`` preceded by the tokenizer's BOS.
  A plain-text prompt becomes one user message; a list of chat messages is rendered as it is (with
  the plain template, the message contents are joined by blank lines).
- The response is cleaned of the generator's special tokens (see ``clean_response``), tokenized with
  ``add_special_tokens=False`` and appended; only response positions are scored. EOS / end-of-turn is
  scored only with ``score_eos=True``.
- Over ``max_length`` tokens, the prompt is cut from the left; a response longer than
  ``max_length - 1`` alone keeps its first tokens (one prompt token is kept so the first response
  token has a context). Either cut sets ``truncated``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

if TYPE_CHECKING:
    from cme_rewards.options import ScorerOptions

PLAIN_PROMPT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
"""Prompt format for verifiers without a chat template (``{prompt}`` is the instruction)."""

GENERATOR_END_MARKERS = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
    "<eos>",
    "</s>",
    "<pad>",
    "<|pad|>",
    "<|finetune_right_pad_id|>",
)
"""End-of-turn / EOS / padding markers of common generator families, removed from a response's end."""

Prompt = str | Sequence[dict[str, Any]]

EMPTY_PROMPT = ""
"""The prompt of ``reduction="pmi"``'s second pass: the same format with an empty instruction."""


@dataclass
class VerifierInput:
    """Token ids for one verifier forward pass.

    Attributes:
        input_ids: prompt ids followed by the scored response ids, ``[seq]``.
        n_prompt: scored positions are ``input_ids[n_prompt:]`` (each predicted from the one before).
        truncated: something was cut to fit ``max_length``.
        error: ``None``, or why this sample cannot be scored (it then gets the floor reward).
    """

    input_ids: list[int]
    n_prompt: int
    truncated: bool = False
    error: str | None = None

    @property
    def n_scored(self) -> int:
        """Number of scored response tokens."""
        return len(self.input_ids) - self.n_prompt


def clean_response(text: str, special_tokens: Iterable[str] = ()) -> str:
    """Remove generator special tokens from a response (OpenRLHF passes them in the text).

    Every occurrence of each string in ``special_tokens`` is removed; then trailing runs of
    ``GENERATOR_END_MARKERS`` (which may legitimately appear inside text, e.g. ``</s>`` in HTML) are
    removed from the end only. Whitespace is kept as it is.
    """
    for token in special_tokens:
        if token:
            text = text.replace(token, "")
    stripped = True
    while stripped:
        stripped = False
        for marker in GENERATOR_END_MARKERS:
            if text.endswith(marker):
                text = text[: -len(marker)]
                stripped = True
    return text


def render_prompt(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Prompt,
    *,
    prompt_template: str | None = None,
    chat_template: str | None = None,
) -> list[int]:
    """Token ids of ``prompt`` as the verifier sees it before the response, ``[prompt_len]``.

    ``prompt_template`` (with a ``{prompt}`` field) forces the plain format; ``chat_template``
    (a Jinja string) replaces the tokenizer's own.
    """
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if prompt_template is None and template:
        messages = (
            [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        )
        text = tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    instruction = prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in prompt)
    text = (prompt_template or PLAIN_PROMPT_TEMPLATE).format(prompt=instruction)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def _is_text(text: str) -> bool:
    """Whether ``text`` is valid Unicode (no lone surrogates, which no tokenizer accepts)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def prompt_problem(prompt: Prompt) -> str | None:
    """Why ``prompt`` cannot be rendered (not text or messages, lone surrogates), or ``None``."""
    if isinstance(prompt, str):
        return None if _is_text(prompt) else "undecodable text in prompt"
    if isinstance(prompt, list | tuple) and prompt:
        for k, message in enumerate(prompt):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                return f"prompt message {k} has no string content"
            if not isinstance(message.get("role"), str):
                return f"prompt message {k} has no string role"
            if not (_is_text(message["content"]) and _is_text(message["role"])):
                return f"undecodable text in prompt message {k}"
        return None
    return "prompt must be text or a non-empty list of chat messages"


def encode_sample(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, response: str, options: ScorerOptions
) -> VerifierInput:
    """:func:`build_verifier_input` with a scorer's options (local and remote verifiers alike)."""
    return build_verifier_input(
        tokenizer,
        prompt,
        response,
        max_length=options.max_length,
        prompt_template=options.prompt_template,
        chat_template=options.chat_template,
        score_eos=options.score_eos,
        strip_special_tokens=options.strip_special_tokens,
    )


def build_verifier_input(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Prompt,
    response: str,
    *,
    max_length: int = 2048,
    prompt_template: str | None = None,
    chat_template: str | None = None,
    score_eos: bool = False,
    strip_special_tokens: Iterable[str] = (),
) -> VerifierInput:
    """Build the verifier's ids for (prompt, response) and mark the scored positions.

    ``response`` is text as the generator produced it (decoded without special tokens, or with
    them: see ``clean_response``). Returns a ``VerifierInput`` with ``error`` set (no exception)
    for a sample that can never be scored: an empty response, undecodable text, a prompt the
    chat template rejects.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if not _is_text(response):
        return VerifierInput([], 0, error="undecodable text in response")
    if (problem := prompt_problem(prompt)) is not None:
        return VerifierInput([], 0, error=problem)
    try:
        prompt_ids = render_prompt(
            tokenizer, prompt, prompt_template=prompt_template, chat_template=chat_template
        )
    except TemplateError as exc:
        return VerifierInput(
            [], 0, error=f"the verifier's chat template rejects the prompt: {exc}"[:300]
        )
    text = clean_response(response, strip_special_tokens)
    response_ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    if not response_ids:
        return VerifierInput(prompt_ids, len(prompt_ids), error="empty response")
    if score_eos and tokenizer.eos_token_id is not None:
        response_ids = [*response_ids, tokenizer.eos_token_id]
    truncated = False
    if len(response_ids) > max_length - 1:
        response_ids = response_ids[: max_length - 1]
        truncated = True
    budget = max_length - len(response_ids)
    if len(prompt_ids) > budget:
        prompt_ids = prompt_ids[-budget:]
        truncated = True
    if not prompt_ids:
        # A prompt that renders to nothing: the first response token has no context to be scored
        # from, so the BOS (or, lacking one, the EOS) token stands in for it.
        fallback = (
            tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        )
        if fallback is None:
            return VerifierInput([], 0, error="empty prompt and the verifier has no BOS token")
        prompt_ids = [fallback]
        if len(prompt_ids) + len(response_ids) > max_length:
            response_ids = response_ids[: max_length - 1]
            truncated = True
    return VerifierInput([*prompt_ids, *response_ids], len(prompt_ids), truncated)
