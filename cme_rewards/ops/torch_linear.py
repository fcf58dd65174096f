"""Plain PyTorch reference of ``cme_rewards.ops.triton_linear`` (same signature and semantics).

Materialises the float32 ``[N, V]`` logits, so it is for checking and small inputs; the
memory-lean CPU path is ``ops.chunked``.
"""

from __future__ import annotations

import torch

from cme_rewards.ops.reference import apply_head_transform


def torch_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Per-token log-probs (nats, float32 ``[N]``): ``log softmax(z)[target]`` with
    ``z = (hidden [N, H] @ weight [V, H].T + bias) * logit_scale``, then ``softcap * tanh(z / softcap)``.

    A target outside ``[0, V)`` gives NaN.
    """
    vocab = weight.shape[0]
    logits = hidden.float() @ weight.float().T
    if bias is not None:
        logits = logits + bias.float()
    logits = apply_head_transform(logits, logit_scale=logit_scale, softcap=softcap)
    tgt = targets.long()
    picked = logits.gather(1, tgt.clamp(0, vocab - 1).unsqueeze(1)).squeeze(1)
    values = picked - torch.logsumexp(logits, dim=1)
    valid = (tgt >= 0) & (tgt < vocab)
    return torch.where(valid, values, torch.full_like(values, float("nan")))
