"""Plain PyTorch reference of ``cme_rewards.ops.triton_logits`` (same signatures and semantics).

Computes in float32 like the kernels, materialising the float32 logits of the scored rows, so it
is meant for checking and for small inputs; the memory-lean CPU path is ``ops.chunked``.
"""

from __future__ import annotations

import torch


def torch_token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token log-probs (nats, float32 ``[N]``) of ``targets`` under ``logits [N, V] / temperature``.

    Rows with ``mask == 0`` or ``segment_ids < 0`` give 0.0; a target outside ``[0, V)`` gives NaN.
    """
    if mask is not None and segment_ids is not None:
        raise ValueError("give either mask or segment_ids, not both")
    n_rows, vocab = logits.shape
    keep = torch.ones(n_rows, dtype=torch.bool, device=logits.device)
    if mask is not None:
        keep = mask != 0
    elif segment_ids is not None:
        keep = segment_ids >= 0
    out = torch.zeros(n_rows, dtype=torch.float32, device=logits.device)
    rows = keep.nonzero().squeeze(1)
    scaled = logits[rows].float() / temperature
    tgt = targets[rows].long()
    valid = (tgt >= 0) & (tgt < vocab)
    picked = scaled.gather(1, tgt.clamp(0, vocab - 1).unsqueeze(1)).squeeze(1)
    values = picked - torch.logsumexp(scaled, dim=1)
    out[rows] = torch.where(valid, values, torch.full_like(values, float("nan")))
    return out


def torch_segment_means(
    logprobs: torch.Tensor, segment_ids: torch.Tensor, num_segments: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(means [S] float32, counts [S] int32)`` of ``logprobs [N]`` per segment id; ids < 0 ignored."""
    keep = segment_ids >= 0
    ids = segment_ids[keep].long()
    sums = torch.zeros(num_segments, dtype=torch.float32, device=logprobs.device)
    sums.index_add_(0, ids, logprobs[keep].float())
    counts = torch.bincount(ids, minlength=num_segments)[:num_segments].to(torch.int32)
    return sums / counts.clamp(min=1), counts
