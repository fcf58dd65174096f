"""Prefix sharing, micro-batch planning and the out-of-memory retry, against the unshared scorer.

The real verifiers (SmolLM2: Llama architecture; Gemma-3: sliding-window attention and a logit
softcap) in float32: rewards with ``share_prefix=True`` equal ``share_prefix=False`` within 1e-4.
"""

from __future__ import annotations

import random
from unittest import mock

import pytest
import torch

from cme_rewards import CMEScorer
from cme_rewards.forward import Piece, halve_pieces, plan_pieces, plan_samples

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about rain, then explain its imagery in two sentences.",
    "Hi",
]
RESPONSES = [
    ["Paris.", "The capital of France is Paris, a city on the Seine.", "Lyon, I think."],
    ["Rain taps the window,\nsoft drums on a tin roof sing,\nthe street drinks the sky.", "No."],
    ["Hello! How can I help you today?", "Hey.", "", "Greetings, traveller, and welcome."],
]


def flat():
    prompts = [p for p, rs in zip(PROMPTS, RESPONSES, strict=True) for _ in rs]
    responses = [r for rs in RESPONSES for r in rs]
    groups = [p for p in prompts]
    return prompts, responses, groups


def both(scorer: CMEScorer, **kw) -> tuple[list, list]:
    """(shared, unshared) results of :func:`flat`; fails unless the shared path really ran."""
    import cme_rewards.scorer as scorer_module

    shared = CMEScorer(model=scorer.model, tokenizer=scorer.tokenizer, share_prefix=True, **kw)
    alone = CMEScorer(model=scorer.model, tokenizer=scorer.tokenizer, share_prefix=False, **kw)
    prompts, responses, groups = flat()
    with mock.patch.object(
        scorer_module, "forward_shared", wraps=scorer_module.forward_shared
    ) as spy:
        got = shared.score(prompts, responses, groups=groups, return_token_logprobs=True)
    assert spy.call_count > 0, "the shared plan was not used"
    return got, alone.score(prompts, responses, groups=groups, return_token_logprobs=True)


@pytest.mark.parametrize("fixture", ["smollm_scorer", "gemma_scorer"])
def test_shared_prefix_equals_unshared(request, fixture):
    scorer = request.getfixturevalue(fixture)
    got, want = both(scorer, token_budget=64)  # small budget: groups split into pieces too
    for g, w in zip(got, want, strict=True):
        assert (g.error, g.n_tokens, g.truncated) == (w.error, w.n_tokens, w.truncated)
        assert g.cme == pytest.approx(w.cme, abs=1e-4)
        if g.token_logprobs is not None:
            torch.testing.assert_close(
                torch.tensor(g.token_logprobs), torch.tensor(w.token_logprobs), atol=1e-4, rtol=0
            )
        assert g.advantage == pytest.approx(w.advantage, abs=1e-3)
    assert sum(r.error is None for r in got) == len(got) - 1  # the empty response


def test_gemma_sliding_window_with_a_long_shared_prompt(gemma_scorer):
    """Prompt + response beyond Gemma-3's 512-token sliding window: the local layers see the same
    keys with and without sharing (left padding keeps distances)."""
    window = gemma_scorer.model.config.sliding_window
    prompt = " ".join(f"fact {i}: the sky is blue." for i in range(window // 6))
    responses = ["Yes, it is blue.", "The sky is often blue because of Rayleigh scattering."]
    short = "Tell me something."
    kw = dict(model=gemma_scorer.model, tokenizer=gemma_scorer.tokenizer, token_budget=4096)
    args = ([prompt, prompt, short, short], responses * 2)
    got = CMEScorer(share_prefix=True, **kw).score(*args)
    want = CMEScorer(share_prefix=False, **kw).score(*args)
    assert len(gemma_scorer.encode(prompt, responses[1]).input_ids) > window
    assert [g.cme for g in got] == pytest.approx([w.cme for w in want], abs=1e-4)


def test_pmi_shares_its_empty_prompt_pass(smollm_scorer):
    got, want = both(smollm_scorer, reduction="pmi")
    assert [g.cme for g in got] == pytest.approx([w.cme for w in want], abs=1e-4)


def test_an_over_long_prompt_is_cut_once_per_group(smollm_scorer):
    prompt = "Repeat after me: " + "la " * 400
    responses = ["la la", "la " * 30]
    scorer = CMEScorer(model=smollm_scorer.model, tokenizer=smollm_scorer.tokenizer, max_length=96)
    results = scorer.score([prompt] * 2, responses)
    encoded = scorer._encode_all([prompt] * 2, responses)
    prefixes = {tuple(x.input_ids[: x.n_prompt]) for x in encoded}
    assert len(prefixes) == 1  # one shared prefix, cut for the longest response
    assert all(len(x.input_ids) <= 96 for x in encoded) and all(r.truncated for r in results)
    alone = CMEScorer(model=smollm_scorer.model, tokenizer=smollm_scorer.tokenizer, max_length=96)
    longest = alone.score([prompt], [responses[1]])[0]
    assert results[1].cme == pytest.approx(longest.cme, abs=1e-4)  # same cut as when alone


def test_out_of_memory_halves_the_micro_batch(smollm_scorer, monkeypatch, caplog):
    """A micro-batch that does not fit is split in halves and retried, down to one row."""
    import cme_rewards.scorer as scorer_module

    real = scorer_module.forward_shared
    seen = []

    def tight(body, head, pad_id, inputs, pieces, device):
        rows = sum(len(p.rows) for p in pieces)
        seen.append(rows)
        if rows > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated: more than 2 rows)")
        return real(body, head, pad_id, inputs, pieces, device)

    monkeypatch.setattr(scorer_module, "forward_shared", tight)
    prompts, responses, _ = flat()
    got = smollm_scorer.score(prompts, responses)
    monkeypatch.setattr(scorer_module, "forward_shared", real)
    want = smollm_scorer.score(prompts, responses)
    assert [g.cme for g in got] == pytest.approx([w.cme for w in want], abs=1e-5)
    assert max(seen) > 2 and "out of memory; retrying the micro-batch in two halves" in caplog.text


def test_plans_cover_every_row_once_within_the_budget():
    rng = random.Random(0)
    groups, response_len, row = [], {}, 0
    for _ in range(40):
        prompt = tuple(range(rng.randint(1, 300)))
        rows = []
        for _ in range(rng.randint(2, 9)):
            response_len[row] = rng.randint(1, 400)
            rows.append(row)
            row += 1
        groups.append((prompt, rows))
    budget = 1024
    batches = plan_pieces(groups, response_len, budget)
    covered = [i for batch in batches for piece in batch for i in piece.rows]
    assert sorted(covered) == list(range(row))
    for batch in batches:
        n_rows = sum(len(p.rows) for p in batch)
        p_max = max(len(p.prompt) for p in batch)
        r_max = max(response_len[i] for p in batch for i in p.rows)
        assert (len(batch) * p_max <= budget and n_rows * r_max <= budget) or n_rows == 1
    lengths = {i: rng.randint(1, 600) for i in range(100)}
    batches = plan_samples(lengths, budget)
    assert sorted(i for b in batches for i in b) == list(range(100))
    assert all(len(b) * max(lengths[i] for i in b) <= budget or len(b) == 1 for b in batches)
    assert halve_pieces([Piece((1,), (5,))]) is None
    assert halve_pieces([Piece((1,), (5, 6, 7))]) == ([Piece((1,), (5,))], [Piece((1,), (6, 7))])


def test_the_cheaper_plan_is_taken():
    """Long prompt, equal responses: group by group; short prompts, responses of very different
    lengths: by length across groups, and alone when sharing would compute more."""
    from cme_rewards.forward import padded_tokens, plan_by_group, plan_by_length

    long_prompt = [((7,) * 1000, [0, 1, 2, 3]), ((8,) * 1000, [4, 5, 6, 7])]
    equal = dict.fromkeys(range(8), 128)
    chosen = plan_pieces(long_prompt, equal, 2048)
    assert chosen == plan_by_group(long_prompt, equal, 2048)
    assert padded_tokens(chosen, equal) == 2 * 1000 + 8 * 128  # each prompt once, no padding

    short = [((1,) * 20, [0, 1]), ((2,) * 30, [2, 3])]
    mixed = {0: 900, 1: 50, 2: 880, 3: 40}
    chosen = plan_pieces(short, mixed, 2048)
    assert chosen == plan_by_length(short, mixed, 2048)
    assert padded_tokens(chosen, mixed) < padded_tokens(plan_by_group(short, mixed, 2048), mixed)
    assert padded_tokens(chosen, mixed) == (2 * 30 + 2 * 900) + (2 * 30 + 2 * 50)


def test_a_call_where_sharing_costs_no_less_runs_unshared(smollm_scorer):
    """One group whose two responses cannot share a micro-batch (budget 256): sharing saves no
    prompt and pads the parts apart, so the call runs unshared."""
    import cme_rewards.scorer as scorer_module
    from cme_rewards.forward import padded_sample_tokens, padded_tokens

    kw = dict(model=smollm_scorer.model, tokenizer=smollm_scorer.tokenizer, token_budget=256)
    scorer = CMEScorer(**kw)
    prompts, responses = ["Hi", "Hi"], ["word " * 200, "ok"]
    inputs = scorer._encode_all(prompts, responses)
    lengths = {i: len(x.input_ids) for i, x in enumerate(inputs)}
    response_len = {i: x.n_scored for i, x in enumerate(inputs)}
    group = [(tuple(inputs[0].input_ids[: inputs[0].n_prompt]), [0, 1])]
    assert padded_sample_tokens(plan_samples(lengths, 256), lengths) <= padded_tokens(
        plan_pieces(group, response_len, 256), response_len
    )
    with mock.patch.object(
        scorer_module, "forward_shared", wraps=scorer_module.forward_shared
    ) as spy:
        got = scorer.score(prompts, responses)
    assert spy.call_count == 0
    want = CMEScorer(share_prefix=False, **kw).score(prompts, responses)
    assert [g.cme for g in got] == [w.cme for w in want]


def test_single_sample_calls_of_one_group_share_the_prompt(smollm_scorer):
    """veRL's verifier actor (like the server and OpenRLHF file mode) puts the scorer behind a
    :class:`BatchedScorer`: one-sample calls of the same group from different reward workers,
    arriving together, land in one batch, and the group's prompt is computed once for all."""
    import concurrent.futures

    import cme_rewards.scorer as scorer_module
    from cme_rewards.batched_scorer import BatchedScorer, Sample
    from cme_rewards.batching import BatchLimits

    prompt = "Name a colour of the sky."
    responses = ["Blue.", "The sky is often blue.", "Grey, when it rains.", "Orange at dusk."]
    batched = BatchedScorer(
        CMEScorer(model=smollm_scorer.model, tokenizer=smollm_scorer.tokenizer, dtype="float32"),
        BatchLimits(max_wait_ms=500),
    )
    with (
        mock.patch.object(
            scorer_module, "forward_shared", wraps=scorer_module.forward_shared
        ) as spy,
        concurrent.futures.ThreadPoolExecutor(len(responses)) as workers,
    ):
        calls = [workers.submit(batched.score_many, [Sample(prompt, r)]) for r in responses]
        got = [c.result()[0] for c in calls]
    rows_per_piece = [len(piece.rows) for call in spy.call_args_list for piece in call.args[4]]
    assert max(rows_per_piece) == len(responses)  # one piece: the prompt ran once for all four
    want = CMEScorer(
        model=smollm_scorer.model, tokenizer=smollm_scorer.tokenizer, dtype="float32",
        share_prefix=False,
    ).score([prompt] * len(responses), responses)  # fmt: skip
    assert [g.cme for g in got] == pytest.approx([w.cme for w in want], abs=1e-4)
