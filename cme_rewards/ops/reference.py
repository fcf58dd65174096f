"""Float64 references of the log-prob ops: slow, exact, used by tests only."""

from __future__ import annotations

import torch


def reference_token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """``log_softmax(logits / temperature)[i, targets[i]]`` in float64; ``[N, V], [N] -> [N]``."""
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    return logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def apply_head_transform(
    logits: torch.Tensor, *, logit_scale: float = 1.0, softcap: float | None = None
) -> torch.Tensor:
    """The output head's logit transform: multiply by ``logit_scale``, then ``softcap * tanh(x / softcap)``."""
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def reference_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Log-probs through the output head in float64; ``[N, H], [V, H], [N] -> [N]``."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    logits = apply_head_transform(logits, logit_scale=logit_scale, softcap=softcap)
    return reference_token_logprobs(logits, targets)
