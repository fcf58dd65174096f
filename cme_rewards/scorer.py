"""``CMEScorer``: the verifier, its prompt format and length-sorted micro-batches behind one call."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from cme_rewards.formatting import Prompt, VerifierInput, build_verifier_input
from cme_rewards.models import DEFAULT_VERIFIER, load_verifier
from cme_rewards.ops import IMPLS, linear_token_logprobs, token_logprobs
from cme_rewards.reductions import REDUCTIONS, grpo_advantages, reduce_token_logprobs
from cme_rewards.results import FLOOR_REWARD, CMEResult

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
        verifier: a name as SPEC.md says (built-in, ``.gguf`` path, folder, hub id, ``random:...``);
            ignored for loading when ``model`` and ``tokenizer`` are given (then it only names them).
        model, tokenizer: an already-loaded causal LM and its tokenizer.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:0"``, ...
        dtype: ``"auto"`` (bf16 on CUDA, fp32 on CPU), ``"float32"``, ``"bfloat16"``, ...
        max_length: most verifier tokens per sample (prompt cut from the left first).
        token_budget: most padded tokens per forward micro-batch (default: 2048 on CPU, 16384 on
            GPU; a longer sample gets a batch of its own).
        reduction: ``"mean"`` (CME) or ``"sum"`` over scored tokens.
        min_tokens: responses with fewer scored tokens get ``floor`` (a length guard).
        floor: reward (nats) of a sample that cannot be scored (its ``error`` says why).
        score_eos: also score the verifier's EOS / end-of-turn token after the response.
        prompt_template: force the plain prompt format (a string with ``{prompt}``).
        chat_template: a Jinja chat template replacing the verifier's own.
        strip_special_tokens: generator special tokens to remove from responses (see
            ``formatting.clean_response``; trailing end-of-turn markers are always removed).
        impl: log-prob op implementation, ``"auto"``, ``"torch"`` or ``"triton"`` (see ``ops``).
        seed: weight seed of a ``random:`` verifier.
        progress: show a progress bar by default.
    """

    def __init__(
        self,
        verifier: str | None = None,
        *,
        model: PreTrainedModel | None = None,
        tokenizer: Tokenizer | None = None,
        device: str = "auto",
        dtype: str = "float32",
        max_length: int = 2048,
        token_budget: int | None = None,
        reduction: str = "mean",
        min_tokens: int = 1,
        floor: float = FLOOR_REWARD,
        score_eos: bool = False,
        prompt_template: str | None = None,
        chat_template: str | None = None,
        strip_special_tokens: Sequence[str] = (),
        impl: str = "auto",
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: must be one of {REDUCTIONS}, got {reduction!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl: must be one of {IMPLS}, got {impl!r}")
        if max_length < 2:
            raise ValueError(f"max_length: must be at least 2, got {max_length}")
        if (token_budget is not None and token_budget < 1) or min_tokens < 1:
            raise ValueError("token_budget and min_tokens: must be at least 1")
        if not math.isfinite(floor):
            raise ValueError(f"floor: must be a finite number, got {floor}")
        if prompt_template is not None and "{prompt}" not in prompt_template:
            raise ValueError("prompt_template: must contain the field {prompt}")
        if (model is None) != (tokenizer is None):
            raise ValueError("model and tokenizer: pass both or neither")
        if model is None:
            self.verifier_name = verifier or DEFAULT_VERIFIER
            model, tokenizer = load_verifier(
                self.verifier_name, device=device, dtype=dtype, seed=seed
            )
        else:
            self.verifier_name = verifier or getattr(model, "name_or_path", "") or "custom model"
            model.eval().requires_grad_(False)
        self.model: PreTrainedModel = model
        self.tokenizer: Tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.token_budget = token_budget or default_token_budget(self.device)
        self.max_length = max_length
        self.reduction = reduction
        self.min_tokens = min_tokens
        self.floor = float(floor)
        self.score_eos = score_eos
        self.prompt_template = prompt_template
        self.chat_template = chat_template
        self.strip_special_tokens = tuple(strip_special_tokens)
        self.impl = impl
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

    def encode(self, prompt: Prompt, response: str) -> VerifierInput:
        """The verifier's ids and scored positions for one sample (no forward pass)."""
        return build_verifier_input(
            self.tokenizer,
            prompt,
            response,
            max_length=self.max_length,
            prompt_template=self.prompt_template,
            chat_template=self.chat_template,
            score_eos=self.score_eos,
            strip_special_tokens=self.strip_special_tokens,
        )

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
        """CME of each ``responses[i]`` given ``prompts[i]``, in input order.

        ``groups[i]`` (e.g. the prompt id of each of G samples) adds GRPO advantages. Samples that
        cannot be scored get ``floor`` with ``error`` set and a logged warning naming their id. A
        sample's value does not depend on the rest of the batch. Thread-safe.
        """
        n = len(prompts)
        for name, seq in (("responses", responses), ("ids", ids), ("groups", groups)):
            if seq is not None and len(seq) != n:
                raise ValueError(f"{name}: {len(seq)} entries for {n} prompts")
        for i, response in enumerate(responses):
            if not isinstance(response, str):
                raise TypeError(f"responses[{i}]: expected a string, got {type(response).__name__}")
        inputs = [self.encode(p, r) for p, r in zip(prompts, responses, strict=True)]
        token_lps: list[torch.Tensor | None] = [None] * n
        with self._lock, torch.inference_mode():
            show = self.progress if progress is None else progress
            bar = tqdm(total=n, desc="CME scoring", unit="sample", disable=not show)
            for batch in self._micro_batches(inputs):
                for i, lp in zip(batch, self._forward([inputs[i] for i in batch]), strict=True):
                    token_lps[i] = lp
                bar.update(len(batch))
            bar.update(n - bar.n)
            bar.close()
        results = []
        for i, (inp, lp) in enumerate(zip(inputs, token_lps, strict=True)):
            sample_id = None if ids is None else str(ids[i])
            if inp.error is None and lp is not None:
                value, error = reduce_token_logprobs(
                    lp, reduction=self.reduction, min_tokens=self.min_tokens, floor=self.floor
                )
            else:
                value, error = self.floor, inp.error
            if error is not None:
                logger.warning(
                    "sample %s: %s; reward set to the floor %s", sample_id or i, error, self.floor
                )
            results.append(
                CMEResult(
                    cme=value,
                    n_tokens=inp.n_scored if inp.error is None else 0,
                    truncated=inp.truncated,
                    error=error,
                    id=sample_id,
                    token_logprobs=lp.tolist()
                    if return_token_logprobs and lp is not None
                    else None,
                )
            )
        if groups is not None:
            for result, adv in zip(
                results, grpo_advantages([r.cme for r in results], groups), strict=True
            ):
                result.advantage = adv
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
