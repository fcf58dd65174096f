"""Plain PyTorch log-prob ops: the production CPU path, and the PyTorch reference of the kernels.

Same semantics as the Triton ops. Rows are taken ``MAX_ROW_CHUNK`` and the vocabulary
``chunk_elements // rows`` at a time, each block's logsumexp merged into a running float32 one,
so a float32 ``[N, V]`` tensor is never held whole.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CHUNK_ELEMENTS = 1 << 22
"""Largest temporary block of logits, in elements (float32: 16 MiB)."""
MAX_ROW_CHUNK = 2048


def apply_head_transform(
    logits: torch.Tensor, *, logit_scale: float = 1.0, softcap: float | None = None
) -> torch.Tensor:
    """The head's logit transform ``x * logit_scale``, then ``softcap * tanh(x / softcap)``.

    Shape- and dtype-preserving (any ``[..., V]``).
    """
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def _online_logprobs(
    n_rows: int,
    vocab: int,
    block_logits: Callable[[slice, int, int], torch.Tensor],
    targets: torch.Tensor,
    device: torch.device,
    chunk_elements: int,
) -> torch.Tensor:
    """Target logit minus online logsumexp over row and vocabulary chunks; NaN for a bad target.

    ``block_logits(rows, v0, v1)`` returns the float32 logits ``[len(rows), v1 - v0]``.
    """
    out = torch.empty(n_rows, dtype=torch.float32, device=device)
    rows = max(1, min(n_rows, MAX_ROW_CHUNK))
    cols = max(1, min(vocab, chunk_elements // rows))
    for r0 in range(0, n_rows, rows):
        rs = slice(r0, min(r0 + rows, n_rows))
        tgt = targets[rs].long()
        n = tgt.numel()
        run_lse = torch.full((n,), float("-inf"), dtype=torch.float32, device=device)
        tgt_logit = torch.full((n,), float("nan"), dtype=torch.float32, device=device)
        for v0 in range(0, vocab, cols):
            v1 = min(v0 + cols, vocab)
            block = block_logits(rs, v0, v1)
            # logsumexp is one fused pass per row; logaddexp merges the blocks (and keeps -inf).
            run_lse = torch.logaddexp(run_lse, torch.logsumexp(block, dim=-1))
            inside = (tgt >= v0) & (tgt < v1)
            if bool(inside.any()):
                local = (tgt - v0).clamp(0, v1 - v0 - 1)
                picked = block.gather(-1, local[:, None]).squeeze(-1)
                tgt_logit = torch.where(inside, picked, tgt_logit)
        out[rs] = tgt_logit - run_lse
    return out


def chunked_token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """The torch path of :func:`cme_rewards.ops.token_logprobs` (same shapes and semantics; any
    float dtype): float32 ``[N]`` log-probs (nats)."""
    n_rows, vocab = logits.shape
    kept = slice(None) if mask is None else (mask != 0).nonzero().squeeze(1)

    def block(rs: slice, v0: int, v1: int) -> torch.Tensor:
        rows = rs if mask is None else kept[rs]
        return logits[rows, v0:v1].float() / temperature

    n_kept = n_rows if mask is None else kept.numel()
    scored = _online_logprobs(n_kept, vocab, block, targets[kept], logits.device, chunk_elements)
    if mask is None:
        return scored
    out = torch.zeros(n_rows, dtype=torch.float32, device=logits.device)
    out[kept] = scored
    return out


def chunked_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """The torch path of :func:`cme_rewards.ops.linear_token_logprobs` (same shapes and semantics):
    logits computed in the weights' dtype, then upcast to float32; float32 ``[N]`` (nats)."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]

    def block(rs: slice, v0: int, v1: int) -> torch.Tensor:
        logits = hidden[rs] @ weight[v0:v1].T
        if bias is not None:
            logits = logits + bias[v0:v1]
        return apply_head_transform(logits.float(), logit_scale=logit_scale, softcap=softcap)

    return _online_logprobs(n_rows, vocab, block, targets, hidden.device, chunk_elements)
