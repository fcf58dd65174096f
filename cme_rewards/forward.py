"""The verifier's forward passes: per-token log-probs of the scored positions, in micro-batches.

:func:`forward_samples` runs each sample as one right-padded row. :func:`forward_shared` runs each
prompt once, left-padded (keys keep their relative distances), into a key/value cache gathered per
response row, then the responses: equal to the unshared forward up to summation order. The head
is applied only at scored rows. :func:`plan_samples` / :func:`plan_pieces` cut micro-batches of at
most ``budget`` padded tokens; :func:`run_halving` halves a batch on out-of-memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from transformers import DynamicCache

from cme_rewards.formatting import VerifierInput
from cme_rewards.ops import linear_token_logprobs, token_logprobs

logger = logging.getLogger(__name__)

B = TypeVar("B")
Groups = Sequence[tuple[tuple[int, ...], list[int]]]
"""``(prompt ids, row indices)`` of each group of responses to one prompt."""


@dataclass(frozen=True)
class Head:
    """The verifier's output head: ``(hidden @ weight.T + bias) * logit_scale``, then softcap."""

    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]
    logit_scale: float
    softcap: float | None
    impl: str

    def logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Log-probs (nats, float32 ``[N]``) of ``targets [N]`` after ``hidden [N, H]``."""
        return linear_token_logprobs(
            hidden,
            self.weight,
            targets,
            bias=self.bias,
            logit_scale=self.logit_scale,
            softcap=self.softcap,
            impl=self.impl,
        )


@dataclass(frozen=True)
class Piece:
    """One prompt and some of its responses, computed together by :func:`forward_shared`.

    ``rows`` index the scorer's inputs; every one of them starts with ``prompt``.
    """

    prompt: tuple[int, ...]
    rows: tuple[int, ...]


# -- planning ---------------------------------------------------------------------------------------


def plan_samples(lengths: dict[int, int], budget: int) -> list[list[int]]:
    """Sample indices, longest first, in batches of at most ``budget`` padded tokens.

    ``lengths`` maps a sample index to its number of tokens; a longer sample gets a batch alone.
    """
    order = sorted(lengths, key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def plan_pieces(groups: Groups, response_len: dict[int, int], budget: int) -> list[list[Piece]]:
    """Micro-batches of pieces whose prompts (``n_prompts x P_max``) and responses
    (``n_rows x R_max``), padded to the longest, each stay within ``budget`` tokens.

    Of :func:`plan_by_group` (each prompt once per piece of its group: best for long prompts and
    alike responses) and :func:`plan_by_length` (responses sorted by length across groups: best for
    short prompts and responses of varied length), the one computing fewer tokens (group on a tie).
    """
    plans = [
        plan_by_group(groups, response_len, budget),
        plan_by_length(groups, response_len, budget),
    ]
    return min(plans, key=lambda plan: padded_tokens(plan, response_len))


def padded_sample_tokens(plan: list[list[int]], lengths: dict[int, int]) -> int:
    """Tokens the verifier computes for a :func:`plan_samples` plan, padding included."""
    return sum(len(batch) * max(lengths[i] for i in batch) for batch in plan)


def padded_tokens(plan: list[list[Piece]], response_len: dict[int, int]) -> int:
    """Tokens the verifier computes for a :func:`plan_pieces` plan, padding included."""
    total = 0
    for batch in plan:
        n_rows = sum(len(p.rows) for p in batch)
        r_max = max(response_len[i] for p in batch for i in p.rows)
        total += len(batch) * max(len(p.prompt) for p in batch) + n_rows * r_max
    return total


def plan_by_group(groups: Groups, response_len: dict[int, int], budget: int) -> list[list[Piece]]:
    """Groups longest prompt first, each group's rows longest response first; a group too big
    for one batch is split into pieces (its prompt then runs once per piece)."""
    batches: list[list[Piece]] = []
    open_batch: list[Piece] = []
    p_max = r_max = n_rows = 0

    def fits(p: int, r: int, rows: int, prompts: int) -> bool:
        return prompts * p <= budget and rows * r <= budget

    for prompt, rows in sorted(groups, key=lambda g: len(g[0]), reverse=True):
        rows = sorted(rows, key=lambda i: response_len[i], reverse=True)
        while rows:
            p_new, r_new = max(p_max, len(prompt)), max(r_max, response_len[rows[0]])
            if open_batch and not fits(p_new, r_new, n_rows + 1, len(open_batch) + 1):
                batches.append(open_batch)
                open_batch, n_rows = [], 0
                p_new, r_new = len(prompt), response_len[rows[0]]
            take = 1
            while take < len(rows) and fits(p_new, r_new, n_rows + take + 1, len(open_batch) + 1):
                take += 1
            open_batch.append(Piece(prompt, tuple(rows[:take])))
            p_max, r_max, n_rows = p_new, r_new, n_rows + take
            rows = rows[take:]
    if open_batch:
        batches.append(open_batch)
    return batches


def plan_by_length(groups: Groups, response_len: dict[int, int], budget: int) -> list[list[Piece]]:
    """Every row longest response first, across groups; a micro-batch holds one piece per prompt
    among its rows."""
    rows = sorted(
        ((i, prompt) for prompt, members in groups for i in members),
        key=lambda row: response_len[row[0]],
        reverse=True,
    )
    batches: list[list[Piece]] = []
    members: dict[tuple[int, ...], list[int]] = {}
    p_max = r_max = n_rows = 0
    for i, prompt in rows:
        p_new, r_new = max(p_max, len(prompt)), max(r_max, response_len[i])
        n_prompts = len(members) + (prompt not in members)
        if members and not (n_prompts * p_new <= budget and (n_rows + 1) * r_new <= budget):
            batches.append([Piece(p, tuple(m)) for p, m in members.items()])
            members, n_rows = {}, 0
            p_new, r_new = len(prompt), response_len[i]
        members.setdefault(prompt, []).append(i)
        p_max, r_max, n_rows = p_new, r_new, n_rows + 1
    if members:
        batches.append([Piece(p, tuple(m)) for p, m in members.items()])
    return batches


# -- running ------------------------------------------------------------------------------------------


def run_halving(
    batch: B,
    run: Callable[[B], dict[int, torch.Tensor]],
    halves: Callable[[B], tuple[B, B] | None],
) -> dict[int, torch.Tensor]:
    """``run(batch)``; on out-of-memory, run its two ``halves`` instead (recursively).

    Raises the out-of-memory error when a batch cannot be split any further.
    """
    try:
        return run(batch)
    except Exception as exc:
        out_of_memory = isinstance(exc, torch.OutOfMemoryError | MemoryError)
        if not out_of_memory or (parts := halves(batch)) is None:
            raise
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    logger.warning("out of memory; retrying the micro-batch in two halves")
    return {**run_halving(parts[0], run, halves), **run_halving(parts[1], run, halves)}


def halve_samples(batch: Sequence[B]) -> tuple[list[B], list[B]] | None:
    """Two halves of a batch of samples, or ``None`` for a single sample."""
    mid = len(batch) // 2
    return (list(batch[:mid]), list(batch[mid:])) if mid else None


def halve_pieces(batch: list[Piece]) -> tuple[list[Piece], list[Piece]] | None:
    """Two halves of a batch of pieces (a lone piece splits its rows), or ``None`` for one row."""
    if len(batch) >= 2 or (rows := halve_samples(batch[0].rows)) is None:
        return halve_samples(batch)
    return [Piece(batch[0].prompt, tuple(rows[0]))], [Piece(batch[0].prompt, tuple(rows[1]))]


def _padded(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device, *, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention mask)``, each ``[len(seqs), longest]``, padded right (or left)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, seq in enumerate(seqs):
        cols = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[b, cols] = torch.tensor(seq, dtype=torch.long)
        mask[b, cols] = 1
    return ids.to(device), mask.to(device)


def forward_samples(
    model: Any,
    head: Head | None,
    pad_id: int,
    inputs: Sequence[VerifierInput],
    batch: Sequence[int],
    device: torch.device,
) -> dict[int, torch.Tensor]:
    """Log-probs ``[n_scored]`` (float32, nats) of each sample in ``batch``, one padded row each.

    ``head=None`` takes the model's own logits (for heads the config does not describe).
    """
    rows = [inputs[i] for i in batch]
    ids, mask = _padded([x.input_ids for x in rows], pad_id, device)
    at_rows, at_cols = [], []
    for b, x in enumerate(rows):
        at_rows.extend([b] * x.n_scored)
        at_cols.extend(range(x.n_prompt - 1, len(x.input_ids) - 1))
    r, c = torch.tensor(at_rows, device=device), torch.tensor(at_cols, device=device)
    targets = ids[r, c + 1]
    if head is not None:
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False)
        flat = head.logprobs(hidden.last_hidden_state[r, c], targets)
    else:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        flat = token_logprobs(logits[r, c], targets)
    return dict(zip(batch, flat.split([x.n_scored for x in rows]), strict=True))


def forward_shared(
    body: Any,
    head: Head,
    pad_id: int,
    inputs: Sequence[VerifierInput],
    pieces: Sequence[Piece],
    device: torch.device,
) -> dict[int, torch.Tensor]:
    """Log-probs ``[n_scored]`` (float32, nats) of every row of ``pieces``, each prompt run once."""
    # Left padding: each prompt ends at column p_max - 1.
    prompt_ids, prompt_mask = _padded([p.prompt for p in pieces], pad_id, device, left=True)
    p_max = prompt_ids.shape[1]
    cache = DynamicCache()  # plain full layers: every key kept, sliding windows masked by position
    last = body(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0),
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state[:, -1]  # [n_pieces, H]: predicts each response's first token

    rows = [(k, i) for k, piece in enumerate(pieces) for i in piece.rows]
    bodies = [inputs[i].input_ids[inputs[i].n_prompt :] for _, i in rows]
    r_max = max(len(b) for b in bodies)
    row_piece = torch.tensor([k for k, _ in rows], device=device)
    cache.batch_select_indices(row_piece)  # [n_rows, heads, p_max, head_dim] per layer
    ids, mask = _padded(bodies, pad_id, device)
    prompt_len = prompt_mask.sum(-1)[row_piece]
    hidden = body(
        input_ids=ids,
        attention_mask=torch.cat([prompt_mask[row_piece], mask], dim=1),
        position_ids=prompt_len[:, None] + torch.arange(r_max, device=device)[None],
        cache_position=torch.arange(p_max, p_max + r_max, device=device),
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state  # [n_rows, r_max, H]
    del cache
    # Token t of a response is predicted after token t-1; token 0 after its prompt's last token.
    predictors = torch.cat([last[row_piece].unsqueeze(1), hidden[:, :-1]], dim=1)
    at_rows = torch.tensor([b for b, resp in enumerate(bodies) for _ in resp], device=device)
    at_cols = torch.tensor([t for resp in bodies for t in range(len(resp))], device=device)
    targets = torch.tensor([t for resp in bodies for t in resp], device=device)
    flat = head.logprobs(predictors[at_rows, at_cols], targets)
    return dict(zip((i for _, i in rows), flat.split([len(b) for b in bodies]), strict=True))
