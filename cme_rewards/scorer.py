"""``CMEScorer``: the verifier, its prompt format and length-sorted micro-batches behind one call."""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from cme_rewards.formatting import EMPTY_PROMPT, Prompt, VerifierInput, encode_sample
from cme_rewards.models import load_verifier
from cme_rewards.ops import (
    check_triton_head,
    linear_token_logprobs,
    select_impl,
    token_logprobs,
    warm_up_triton_head,
)
from cme_rewards.options import ScorerOptions
from cme_rewards.results import CMEResult, finish_groups, finish_sample

logger = logging.getLogger(__name__)


CPU_TOKEN_BUDGET = 2048
"""Default padded tokens per CPU forward: larger batches only add padding and cache misses there."""
GPU_TOKEN_BUDGET = 16384


def default_token_budget(device: torch.device | str) -> int:
    """Default ``token_budget`` (padded tokens per forward micro-batch) for ``device``."""
    return CPU_TOKEN_BUDGET if torch.device(device).type == "cpu" else GPU_TOKEN_BUDGET


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


class CMEScorer:
    """Scores responses by their mean log-likelihood (nats) under a frozen verifier.

    Args:
        verifier: the verifier's name (see :class:`ScorerOptions`); with ``model`` and
            ``tokenizer`` it only names them.
        model, tokenizer: an already-loaded causal LM and its tokenizer (``device``, ``dtype``
            and ``seed`` are then not used: the model stays as it is).
        options: a :class:`ScorerOptions`; keyword ``overrides`` (its field names: ``dtype``,
            ``max_length``, ``reduction``, ``floor``, ...) replace its values.
        progress: show a progress bar by default.

    Every option is declared once in :class:`ScorerOptions` (types, units, defaults, checks); a bad
    one raises :class:`OptionError` naming it before any model loads.
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
        self.token_budget = opts.token_budget or default_token_budget(self.device)
        self.progress = progress
        self._pad_id = next(
            i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None
        )
        self._body = model.get_decoder()
        head = model.get_output_embeddings()
        self._head_weight: torch.Tensor = head.weight
        self._head_bias: torch.Tensor | None = getattr(head, "bias", None)
        self._logit_scale, self._softcap = head_transform_from_config(model.config)
        self._lock = threading.Lock()
        self._fused_head = self._fused_head_matches_model()
        self.impl = self._checked_impl()

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
        group-relative floor. Samples that cannot be scored get the floor with ``error`` set and a
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
        inputs = [self.encode(p, r) for p, r in zip(prompts, responses, strict=True)]
        pmi = self.options.reduction == "pmi"
        bare = (
            [
                self.encode(EMPTY_PROMPT, r) if x.error is None else x
                for x, r in zip(inputs, responses, strict=True)
            ]
            if pmi
            else []
        )
        everything = inputs + bare
        token_lps: list[torch.Tensor | None] = [None] * len(everything)
        with self._lock, torch.inference_mode():
            show = self.progress if progress is None else progress
            bar = tqdm(total=n, desc="CME scoring", unit="sample", disable=not show)
            for batch in self._micro_batches(everything):
                for i, lp in zip(batch, self._forward([everything[i] for i in batch]), strict=True):
                    token_lps[i] = lp
                bar.update(sum(i < n for i in batch))
            bar.update(n - bar.n)
            bar.close()
        results = [
            finish_sample(
                inp,
                token_lps[i],
                self.options,
                id=str(ids[i]) if ids is not None else None,
                unconditional=token_lps[n + i] if pmi else None,
                keep_token_logprobs=return_token_logprobs,
            )
            for i, inp in enumerate(inputs)
        ]
        if groups is not None:
            finish_groups(results, groups, self.options)
        return results

    def _micro_batches(self, inputs: list[VerifierInput]) -> list[list[int]]:
        """Indices of scorable samples, longest first, in batches of at most ``token_budget`` padded tokens."""
        order = sorted(
            (i for i, x in enumerate(inputs) if x.error is None),
            key=lambda i: len(inputs[i].input_ids),
            reverse=True,
        )
        batches: list[list[int]] = []
        for i in order:
            if (
                batches
                and (len(batches[-1]) + 1) * len(inputs[batches[-1][0]].input_ids)
                <= self.token_budget
            ):
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches

    def _forward(self, batch: list[VerifierInput]) -> list[torch.Tensor]:
        """Per-sample log-probs ``[n_scored]`` (float32, nats) for one right-padded micro-batch."""
        width = max(len(x.input_ids) for x in batch)
        ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        rows, cols = [], []
        for b, x in enumerate(batch):
            ids[b, : len(x.input_ids)] = torch.tensor(x.input_ids)
            mask[b, : len(x.input_ids)] = 1
            rows.extend([b] * x.n_scored)
            cols.extend(range(x.n_prompt - 1, len(x.input_ids) - 1))
        ids, mask = ids.to(self.device), mask.to(self.device)
        rows_t, cols_t = (
            torch.tensor(rows, device=self.device),
            torch.tensor(cols, device=self.device),
        )
        targets = ids[rows_t, cols_t + 1]
        if self._fused_head:
            hidden = self._body(
                input_ids=ids, attention_mask=mask, use_cache=False
            ).last_hidden_state
            flat = linear_token_logprobs(
                hidden[rows_t, cols_t],
                self._head_weight,
                targets,
                bias=self._head_bias,
                logit_scale=self._logit_scale,
                softcap=self._softcap,
                impl=self.impl,
            )
        else:
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            flat = token_logprobs(logits[rows_t, cols_t], targets, impl=self.impl)
        return list(flat.split([x.n_scored for x in batch]))

    def _checked_impl(self) -> str:
        """The log-prob implementation to use: Triton only after it agrees with float64 here.

        Where ``impl`` resolves to Triton (CUDA), the Triton head runs on a probe batch on this
        device against a float64 reference (tolerances in ``cme_rewards.ops.default_tolerance``)
        and is warmed up (autotuned) for the token budget; on any disagreement or failure the
        scorer falls back to the PyTorch path with a warning naming the difference.
        """
        impl = select_impl(self.options.impl, self.device)
        if impl != "triton" or not self._fused_head:
            return impl
        generator = torch.Generator(device="cpu").manual_seed(0)
        hidden_size = self._head_weight.shape[1]
        probe = torch.randn(64, hidden_size, generator=generator).to(
            self.device, self._head_weight.dtype
        )
        targets = torch.randint(0, self._head_weight.shape[0], (64,), generator=generator).to(
            self.device
        )
        head = {"bias": self._head_bias, "logit_scale": self._logit_scale, "softcap": self._softcap}
        result = check_triton_head(probe, self._head_weight, targets, **head)
        if result.ok and self.device.type == "cuda":  # autotune now, not on the first call
            result = warm_up_triton_head(self._head_weight, max_rows=self.token_budget, **head)
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
        """Check once that body + output head + config transform reproduce the model's own logits.

        A model whose head does something the config does not describe falls back (with a warning)
        to the model's full forward, which computes logits at every position.
        """
        ids = (
            torch.tensor([[self._pad_id, 1, 2, 3, 4, 5, 6, 7]], device=self.device)
            % self._head_weight.shape[0]
        )
        with torch.inference_mode():
            expected = torch.log_softmax(
                self.model(input_ids=ids, use_cache=False).logits[0].double(), -1
            )
            hidden = self._body(input_ids=ids, use_cache=False).last_hidden_state[0]
            targets = torch.arange(ids.shape[1], device=self.device) % self._head_weight.shape[0]
            got = linear_token_logprobs(
                hidden,
                self._head_weight,
                targets,
                bias=self._head_bias,
                logit_scale=self._logit_scale,
                softcap=self._softcap,
                impl="torch",
            )
        want = expected[torch.arange(ids.shape[1]), targets]
        tol = 1e-3 if self._head_weight.dtype in (torch.float32, torch.float64) else 1e-1
        if torch.allclose(got.double(), want, atol=tol, rtol=0):
            return True
        logger.warning(
            "verifier %s: its output head does not match body + lm_head + config transform; "
            "computing full logits instead (slower, more memory)",
            self.verifier_name,
        )
        return False
