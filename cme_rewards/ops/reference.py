"""Float64 references of the log-prob ops, for the tests and the load-time check of the Triton path.

Every logit is computed and reduced in float64 from the same (rounded) inputs the fast paths read,
so a difference is the fast path's own error. A target outside ``[0, V)`` gives NaN.
"""

from __future__ import annotations

import torch

from cme_rewards.ops.chunked import apply_head_transform

_BLOCK_ELEMENTS = 1 << 25
"""Largest float64 temporary of the blocked reference, in elements (256 MiB)."""


def _pick(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``logp[i, targets[i]]``, NaN where the target is outside ``[0, V)``."""
    tgt = targets.long()
    valid = (tgt >= 0) & (tgt < logp.shape[-1])
    picked = logp.gather(-1, tgt.clamp(0, logp.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.full_like(picked, float("nan")))


def reference_token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """``log_softmax(logits / temperature)[i, targets[i]]`` in float64 (nats); ``[N, V], [N] -> [N]``."""
    return _pick(torch.log_softmax(logits.double() / temperature, dim=-1), targets)


def reference_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Log-probs (nats, float64) through the output head; ``[N, H], [V, H], [N] -> [N]``.

    Logits as in ``linear_token_logprobs``, over vocabulary blocks of ``2**25 / max(N, H)`` rows
    of ``weight``, so a check on a GPU never holds a float64 copy of a whole head.
    """
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    block = max(1, _BLOCK_ELEMENTS // max(n_rows, dim, 1))
    h64 = hidden.double()
    lse = torch.full((n_rows,), float("-inf"), dtype=torch.float64, device=hidden.device)
    picked = torch.full((n_rows,), float("nan"), dtype=torch.float64, device=hidden.device)
    tgt = targets.long()
    for v0 in range(0, vocab, block):
        v1 = min(v0 + block, vocab)
        z = h64 @ weight[v0:v1].double().T
        if bias is not None:
            z = z + bias[v0:v1].double()
        z = apply_head_transform(z, logit_scale=logit_scale, softcap=softcap)
        lse = torch.logaddexp(lse, torch.logsumexp(z, dim=-1))
        inside = (tgt >= v0) & (tgt < v1)
        local = (tgt - v0).clamp(0, v1 - v0 - 1)
        picked = torch.where(inside, z.gather(-1, local[:, None]).squeeze(-1), picked)
    return picked - lse
