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
    end, stripped = len(text), True
    while stripped:  # one pass over the trailing markers, no copies: linear in the text
        stripped = False
        for marker in GENERATOR_END_MARKERS:
            if text.endswith(marker, 0, end):
                end -= len(marker)
                stripped = True
    return text[:end]


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


def is_text(text: str) -> bool:
    """Whether ``text`` is valid Unicode (no lone surrogates, which no tokenizer accepts)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def prompt_problem(prompt: Prompt) -> str | None:
    """Why ``prompt`` cannot be rendered (not text or messages, lone surrogates), or ``None``."""
    if isinstance(prompt, str):
        return None if is_text(prompt) else "undecodable text in prompt"
    if not isinstance(prompt, list | tuple) or not prompt:
        return "prompt must be text or a non-empty list of chat messages"
    for k, message in enumerate(prompt):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return f"prompt message {k} has no string content"
        if not isinstance(message.get("role"), str):
            return f"prompt message {k} has no string role"
        if not (is_text(message["content"]) and is_text(message["role"])):
            return f"undecodable text in prompt message {k}"
    return None


def encode_sample(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, response: str, options: ScorerOptions
) -> VerifierInput:
    """:func:`build_group_inputs` for one sample, with a scorer's options (local and remote alike)."""
    return encode_group(tokenizer, prompt, [response], options)[0]


def encode_group(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Prompt,
    responses: Sequence[str],
    options: ScorerOptions,
) -> list[VerifierInput]:
    """:func:`build_group_inputs` with a scorer's options."""
    names = ("max_length", "prompt_template", "chat_template", "score_eos", "strip_special_tokens")
    kwargs = {name: getattr(options, name) for name in names}
    return build_group_inputs(tokenizer, prompt, responses, **kwargs)


def build_verifier_input(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Prompt,
    response: str,
    **kwargs: Any,
) -> VerifierInput:
    """The verifier's ids for one (prompt, response): :func:`build_group_inputs` of one response."""
    return build_group_inputs(tokenizer, prompt, [response], **kwargs)[0]


def build_group_inputs(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Prompt,
    responses: Sequence[str],
    *,
    max_length: int = 2048,
    prompt_template: str | None = None,
    chat_template: str | None = None,
    score_eos: bool = False,
    strip_special_tokens: Iterable[str] = (),
) -> list[VerifierInput]:
    """Build the verifier's ids for responses to one prompt and mark the scored positions.

    Each response is text as the generator produced it (decoded without special tokens, or with
    them: see ``clean_response``). The prompt is rendered once and, when prompt + the longest
    response exceed ``max_length``, cut from the left once for all of them, so every member keeps
    the same prefix (with one response this is the per-sample rule). A sample that can never be
    scored gets a ``VerifierInput`` with ``error`` set (no exception): an empty response,
    undecodable text, a prompt the chat template rejects.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    prompt_ids = _prompt_ids(tokenizer, prompt, prompt_template, chat_template)
    if isinstance(prompt_ids, str):
        return [VerifierInput([], 0, error=prompt_ids) for _ in responses]
    bodies: list[list[int] | str] = []
    truncated: list[bool] = []
    for response in responses:
        ids = _response_ids(tokenizer, response, score_eos, strip_special_tokens)
        cut = isinstance(ids, list) and len(ids) > max_length - 1
        bodies.append(ids[: max_length - 1] if cut else ids)
        truncated.append(cut)
    longest = max((len(b) for b in bodies if isinstance(b, list)), default=0)
    budget = max_length - longest
    if len(prompt_ids) > budget:
        prompt_ids = prompt_ids[-budget:]
        truncated = [True] * len(bodies)
    out = []
    for body, cut in zip(bodies, truncated, strict=True):
        if isinstance(body, str):
            out.append(VerifierInput(list(prompt_ids), len(prompt_ids), error=body))
        else:
            out.append(VerifierInput([*prompt_ids, *body], len(prompt_ids), cut))
    return out


def _prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Prompt,
    prompt_template: str | None,
    chat_template: str | None,
) -> list[int] | str:
    """The prompt's ids (never none), or why it cannot be rendered."""
    if (problem := prompt_problem(prompt)) is not None:
        return problem
    try:
        ids = render_prompt(
            tokenizer, prompt, prompt_template=prompt_template, chat_template=chat_template
        )
    except TemplateError as exc:
        return f"the verifier's chat template rejects the prompt: {exc}"[:300]
    if ids:
        return ids
    # A prompt that renders to nothing: the first response token has no context to be scored
    # from, so the BOS (or, lacking one, the EOS) token stands in for it.
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [bos] if bos is not None else "empty prompt and the verifier has no BOS token"


def _response_ids(
    tokenizer: PreTrainedTokenizerBase,
    response: str,
    score_eos: bool,
    strip_special_tokens: Iterable[str],
) -> list[int] | str:
    """The response's scored ids (EOS appended with ``score_eos``), or why it cannot be scored."""
    if not is_text(response):
        return "undecodable text in response"
    text = clean_response(response, strip_special_tokens)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    if not ids:
        return "empty response"
    if score_eos and tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    return ids
