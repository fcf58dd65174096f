"""``CMEScorer``: the verifier, its prompt format and its forward passes behind one call.

A call encodes the samples (with ``share_prefix``, each group's prompt is rendered and cut once),
plans them into length-sorted micro-batches of at most ``token_budget`` padded tokens (running
samples alone when sharing would compute more tokens), runs them (:mod:`cme_rewards.forward`) with
the output head applied only at scored positions, and finishes each sample
(:func:`cme_rewards.results.finish_sample`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Hashable, Sequence
from functools import partial
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from cme_rewards.formatting import EMPTY_PROMPT, Prompt, VerifierInput, encode_group, encode_sample
from cme_rewards.forward import (
    Head,
    Piece,
    forward_samples,
    forward_shared,
    halve_pieces,
    halve_samples,
    padded_sample_tokens,
    padded_tokens,
    plan_pieces,
    plan_samples,
    run_halving,
)
from cme_rewards.models import load_verifier
from cme_rewards.ops import check_triton_head, select_impl, warm_up_triton_head
from cme_rewards.options import ScorerOptions
from cme_rewards.reductions import group_members
from cme_rewards.results import CMEResult, finish_groups, finish_sample

logger = logging.getLogger(__name__)


CPU_TOKEN_BUDGET = 2048
"""Default padded tokens per CPU forward: larger batches only add padding and cache misses there."""
GPU_TOKEN_BUDGET_RANGE = (4096, 65536)
GPU_MEMORY_SHARE = 0.25
"""Share of the free GPU memory one micro-batch's activations may take (default token budget)."""


def default_token_budget(model: PreTrainedModel, device: torch.device) -> int:
    """Default ``token_budget`` (padded tokens per micro-batch) of ``model`` on ``device``.

    CPU: 2048. CUDA: what :data:`GPU_MEMORY_SHARE` of the free memory holds, at the bytes one
    token takes through the body (the MLP's activations and every layer's keys and values),
    clamped to :data:`GPU_TOKEN_BUDGET_RANGE`; an out-of-memory batch is halved and retried anyway.
    """
    if device.type != "cuda":
        return CPU_TOKEN_BUDGET
    config = model.config.get_text_config()
    element = torch.finfo(next(model.parameters()).dtype).bits // 8
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = element * (
        4 * config.intermediate_size
        + 8 * config.hidden_size
        + 2 * config.num_hidden_layers * heads * head_dim
    )
    free, _ = torch.cuda.mem_get_info(device)
    low, high = GPU_TOKEN_BUDGET_RANGE
    return int(min(high, max(low, GPU_MEMORY_SHARE * free / per_token)))


def head_transform_from_config(config: Any) -> tuple[float, float | None]:
    """``(logit_scale, softcap)`` the model applies after its output head.

    Covers ``final_logit_softcapping`` (Gemma 2/3), ``logit_scale`` (Cohere, multiplied) and
    ``logits_scaling`` (Granite, divided).
    """
    config = getattr(config, "text_config", None) or config
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    if getattr(config, "logits_scaling", None):
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return scale, (float(softcap) if softcap else None)


def prompt_key(prompt: Prompt) -> str:
    """A hashable key equal for equal prompts (text, or lists of chat messages)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, default=str)


class CMEScorer:
    """Scores responses by their mean log-likelihood (nats) under a frozen verifier.

    Args:
        verifier: the verifier's name (see :class:`ScorerOptions`); with ``model`` and
            ``tokenizer`` (an already-loaded causal LM, kept as it is) it only names them.
        options, **overrides: a :class:`ScorerOptions` and field values replacing its own; a bad
            one raises :class:`OptionError` naming it before any model loads.
        progress: show a progress bar by default.
    """

    def __init__(
        self,
        verifier: str | None = None,
        *,
        model: PreTrainedModel | None = None,
        tokenizer: Tokenizer | None = None,
        options: ScorerOptions | None = None,
        progress: bool = False,
        **overrides: Any,
    ) -> None:
        if (model is None) != (tokenizer is None):
            raise ValueError("model and tokenizer: pass both or neither")
        if model is None and verifier is not None:
            overrides["verifier"] = verifier
        self.options: ScorerOptions = ScorerOptions.from_kwargs(options, **overrides)
        opts = self.options
        if model is None:
            opts.check_here()
            self.verifier_name = opts.verifier
            model, tokenizer = load_verifier(
                opts.verifier, device=opts.device, dtype=opts.dtype, seed=opts.seed
            )
        else:
            self.verifier_name = verifier or getattr(model, "name_or_path", "") or "custom model"
            model.eval().requires_grad_(False)
        self.model: PreTrainedModel = model
        self.tokenizer: Tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.token_budget = opts.token_budget or default_token_budget(model, self.device)
        self.progress = progress
        self._pad_id = next(
            i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None
        )
        self._body = model.get_decoder()
        out = model.get_output_embeddings()
        scale, softcap = head_transform_from_config(model.config)
        self._head = Head(out.weight, getattr(out, "bias", None), scale, softcap, "torch")
        self._lock = threading.Lock()
        self._fused_head = self._fused_head_matches_model()
        self.impl = self._checked_impl()
        self._head = dataclasses.replace(self._head, impl=self.impl)

    def encode(self, prompt: Prompt, response: str) -> VerifierInput:
        """The verifier's ids and scored positions for one sample (no forward pass)."""
        return encode_sample(self.tokenizer, prompt, response, self.options)

    def score(
        self,
        prompts: Sequence[Prompt],
        responses: Sequence[str],
        *,
        ids: Sequence[Any] | None = None,
        groups: Sequence[Hashable] | None = None,
        return_token_logprobs: bool = False,
        progress: bool | None = None,
    ) -> list[CMEResult]:
        """The reward (nats) of each ``responses[i]`` given ``prompts[i]``, in input order.

        ``groups[i]`` (e.g. the prompt id of each of G samples) adds GRPO advantages and the
        group-relative floor. With ``share_prefix`` (default), responses to the same prompt share
        one prompt forward. Samples that cannot be scored get the floor with ``error`` set and a
        logged warning naming their id. A sample's value does not depend on the rest of the
        batch. Thread-safe.
        """
        n = len(prompts)
        for name, seq in (("responses", responses), ("ids", ids), ("groups", groups)):
            if seq is not None and len(seq) != n:
                raise ValueError(f"{name}: {len(seq)} entries for {n} prompts")
        for i, response in enumerate(responses):
            if not isinstance(response, str):
                raise TypeError(f"responses[{i}]: expected a string, got {type(response).__name__}")
        inputs = self._encode_all(prompts, responses)
        pmi = self.options.reduction.startswith("pmi")  # pmi, pmi_sum: also without the prompt
        if pmi:  # the same responses after an empty instruction: one more (shared) pass
            scorable = [i for i, x in enumerate(inputs) if x.error is None]
            bare = self._encode_all(
                [EMPTY_PROMPT] * len(scorable), [responses[i] for i in scorable]
            )
            bare_of = dict(zip(scorable, range(n, n + len(scorable)), strict=True))
            inputs = inputs + bare
        show = self.progress if progress is None else progress
        with self._lock, torch.inference_mode():
            token_lps = self._logprobs(inputs, show)
        results = [
            finish_sample(
                inputs[i],
                token_lps.get(i),
                self.options,
                id=str(ids[i]) if ids is not None else None,
                unconditional=token_lps.get(bare_of[i]) if pmi and i in bare_of else None,
                keep_token_logprobs=return_token_logprobs,
            )
            for i in range(n)
        ]
        if groups is not None:
            finish_groups(results, groups, self.options)
        return results

    # -- encoding and forward passes ------------------------------------------------------------

    def _encode_all(
        self, prompts: Sequence[Prompt], responses: Sequence[str]
    ) -> list[VerifierInput]:
        """Encode every sample; with ``share_prefix`` each distinct prompt is rendered and cut once."""
        if not self.options.share_prefix:
            return [self.encode(p, r) for p, r in zip(prompts, responses, strict=True)]
        inputs: dict[int, VerifierInput] = {}
        for rows in group_members([prompt_key(p) for p in prompts]).values():
            encoded = encode_group(
                self.tokenizer, prompts[rows[0]], [responses[i] for i in rows], self.options
            )
            inputs.update(zip(rows, encoded, strict=True))
        return [inputs[i] for i in range(len(prompts))]

    def _logprobs(self, inputs: list[VerifierInput], show: bool) -> dict[int, torch.Tensor]:
        """Per-token log-probs ``[n_scored]`` (float32, nats) of every scorable input, by index."""
        scorable = [i for i, x in enumerate(inputs) if x.error is None]
        shared_groups: dict[tuple[int, ...], list[int]] = {}
        if self.options.share_prefix and self._fused_head:
            for i in scorable:
                x = inputs[i]
                shared_groups.setdefault(tuple(x.input_ids[: x.n_prompt]), []).append(i)
            shared_groups = {k: v for k, v in shared_groups.items() if len(v) > 1}
        shared = {i for rows in shared_groups.values() for i in rows}
        alone = {i: len(inputs[i].input_ids) for i in scorable if i not in shared}
        alone_plan = plan_samples(alone, self.token_budget)
        pieces_plan: list[list[Piece]] = []
        if shared:
            response_len = {i: inputs[i].n_scored for i in shared}
            pieces_plan = plan_pieces(list(shared_groups.items()), response_len, self.token_budget)
            lengths = {i: len(inputs[i].input_ids) for i in scorable}
            unshared_plan = plan_samples(lengths, self.token_budget)
            shared_cost = padded_tokens(pieces_plan, response_len)
            shared_cost += padded_sample_tokens(alone_plan, alone)
            if padded_sample_tokens(unshared_plan, lengths) <= shared_cost:  # padding outweighs
                alone_plan, pieces_plan = unshared_plan, []
        head = self._head if self._fused_head else None
        device = self.device
        run_samples = partial(
            forward_samples, self.model, head, self._pad_id, inputs, device=device
        )
        run_pieces = partial(
            forward_shared, self._body, self._head, self._pad_id, inputs, device=device
        )
        out: dict[int, torch.Tensor] = {}
        with tqdm(total=len(scorable), desc="CME scoring", unit="sample", disable=not show) as bar:
            for batch in alone_plan:
                out.update(run_halving(batch, run_samples, halve_samples))
                bar.update(len(batch))
            for pieces in pieces_plan:
                out.update(run_halving(pieces, run_pieces, halve_pieces))
                bar.update(sum(len(p.rows) for p in pieces))
        return out

    # -- load-time checks ---------------------------------------------------------------------------

    def _checked_impl(self) -> str:
        """The log-prob implementation: Triton only after its head agrees with float64 on a probe
        batch here (``cme_rewards.ops.default_tolerance``) and is autotuned for the token budget;
        else ``torch``, with a warning naming the difference."""
        impl = select_impl(self.options.impl, self.device)
        if impl != "triton" or not self._fused_head:
            return impl
        generator = torch.Generator(device="cpu").manual_seed(0)
        weight = self._head.weight
        probe = torch.randn(64, weight.shape[1], generator=generator).to(self.device, weight.dtype)
        targets = torch.randint(0, weight.shape[0], (64,), generator=generator).to(self.device)
        head = self._head
        transform = {"bias": head.bias, "logit_scale": head.logit_scale, "softcap": head.softcap}
        result = check_triton_head(probe, weight, targets, **transform)
        if result.ok and self.device.type == "cuda":  # autotune now, not on the first call
            result = warm_up_triton_head(weight, max_rows=self.token_budget, **transform)
        if result.ok:
            return impl
        logger.warning(
            "verifier %r: the Triton head disagrees with float64 on %s (%s); using impl='torch'",
            self.verifier_name,
            self.device,
            result.describe(),
        )
        return "torch"

    def _fused_head_matches_model(self) -> bool:
        """Whether body + output head + config transform reproduce the model's own logits; if not,
        warn and use the model's full forward (logits at every position, no prefix sharing)."""
        vocab = self._head.weight.shape[0]
        ids = torch.tensor([[self._pad_id, 1, 2, 3, 4, 5, 6, 7]], device=self.device) % vocab
        with torch.inference_mode():
            expected = torch.log_softmax(
                self.model(input_ids=ids, use_cache=False).logits[0].double(), -1
            )
            hidden = self._body(input_ids=ids, use_cache=False).last_hidden_state[0]
            targets = torch.arange(ids.shape[1], device=self.device) % vocab
            got = self._head.logprobs(hidden, targets)
        want = expected[torch.arange(ids.shape[1]), targets]
        tol = 1e-3 if self._head.weight.dtype in (torch.float32, torch.float64) else 1e-1
        if torch.allclose(got.double(), want, atol=tol, rtol=0):
            return True
        logger.warning(
            "verifier %r: its output head does not match body + lm_head + config transform; "
            "computing full logits instead (slower, more memory)",
            self.verifier_name,
        )
        return False
