"""End-to-end check of ``CMEScorer`` on the Triton path against a float64 forward of the same model.

For random-weight verifiers of three families whose configs need no download (weights cannot
travel to the GPU machine): Qwen2.5-like (vocabulary 151,936, tied head), Llama-3-like (128,256)
and Gemma-3-like (262,144, final logit softcap 30), each with 2 layers and hidden size 640 (one
compiled head kernel per config serves all three; the tests cover H = 4096), it scores random-word samples
with ``CMEScorer(impl="triton")`` in float32 and bfloat16 and compares every token's log-prob with

* a float64 forward of the whole model (the same rounded weights, upcast): the end-to-end error;
* the float64 head on the scorer's own body (same dtype, one sample per batch): the error of the
  Triton head alone, bounded by ``cme_rewards.ops.default_tolerance``.

The tokenizer is a word-level one built in memory (``w0 .. w{V-1}``), so that the targets spread
over the whole vocabulary. Bounds (``BOUNDS``): float32 within 1e-4 of float64 per token; bf16 head
within 2e-3 per token, bf16 sample CME within 0.05 nats of the float64 forward (the bf16 body's own
rounding). Writes ``--json`` after every (family, dtype); exit status 1 when a bound is missed.

    python3 benchmarks/gpu/check_scorer.py --json e2e.json            # on a GPU
    TRITON_INTERPRET=1 python3 benchmarks/gpu/check_scorer.py --dry   # tiny shapes on CPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

if "--dry" in sys.argv:  # the interpreter is chosen before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

BOUNDS = {
    "float32": {"token_vs_f64_forward": 1e-4, "token_vs_f64_head": 1e-4},
    "bfloat16": {"token_vs_f64_head": 2e-3, "cme_vs_f64_forward": 0.05},
}
LOGIT_STD = 4.0  # the head is rescaled so that logits have about this spread (random init: ~0.5)


def family_configs(dry: bool) -> dict:
    """transformers configs of the three families; real vocabularies, small bodies."""
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    if dry:
        common = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
        return {
            "qwen2.5-like": Qwen2Config(
                vocab_size=1003, num_hidden_layers=2, num_key_value_heads=2, **common
            ),
            "llama3-like": LlamaConfig(
                vocab_size=998, num_hidden_layers=2, num_key_value_heads=2, **common
            ),
            "gemma3-like": Gemma3TextConfig(
                vocab_size=1001,
                num_hidden_layers=2,
                num_key_value_heads=1,
                head_dim=16,
                final_logit_softcapping=30.0,
                **common,
            ),
        }
    return {
        "qwen2.5-like": Qwen2Config(
            vocab_size=151936,
            hidden_size=640,
            intermediate_size=1536,
            num_hidden_layers=2,
            num_attention_heads=10,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
        "llama3-like": LlamaConfig(
            vocab_size=128256,
            hidden_size=640,
            intermediate_size=2048,
            num_hidden_layers=2,
            num_attention_heads=10,
            num_key_value_heads=5,
            tie_word_embeddings=False,
        ),
        "gemma3-like": Gemma3TextConfig(
            vocab_size=262144,
            hidden_size=640,
            intermediate_size=2048,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            final_logit_softcapping=30.0,
        ),
    }


def build_model(config, device: torch.device, seed: int):
    """A random-weight causal LM of ``config`` in float32, head rescaled to realistic logits."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.mul_(LOGIT_STD / (head.std() * math.sqrt(config.hidden_size)))
    return model.to(device).requires_grad_(False)


def word_tokenizer(vocab: int):
    """A word-level tokenizer whose words ``w0 .. w{vocab-1}`` are exactly the ids 0..vocab-1."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="w0", pad_token="w0", eos_token="w1", bos_token="w2"
    )


def samples(vocab: int, n: int, max_len: int, seed: int) -> tuple[list[str], list[str]]:
    gen = torch.Generator().manual_seed(seed)

    def words(length: int) -> str:
        return " ".join(f"w{i}" for i in torch.randint(3, vocab, (length,), generator=gen).tolist())

    lengths = torch.randint(max_len // 4, max_len, (2, n), generator=gen).tolist()
    return [words(k) for k in lengths[0]], [words(k) for k in lengths[1]]


def f64_token_logprobs(model64, ids: list[int], n_prompt: int) -> torch.Tensor:
    """Scored-token log-probs of one sample under a float64 forward of the whole model."""
    x = torch.tensor([ids], device=next(model64.parameters()).device)
    logits = model64(input_ids=x, use_cache=False).logits[0].double()
    logp = torch.log_softmax(logits[n_prompt - 1 : -1], dim=-1)
    return logp.gather(1, x[0, n_prompt:, None]).squeeze(1)


def f64_head_token_logprobs(model, ids: list[int], n_prompt: int) -> torch.Tensor:
    """Scored-token log-probs of one sample: the model's own body, then the float64 head."""
    from cme_rewards.ops.reference import reference_linear_token_logprobs
    from cme_rewards.scorer import head_transform_from_config

    x = torch.tensor([ids], device=next(model.parameters()).device)
    hidden = model.get_decoder()(input_ids=x, use_cache=False).last_hidden_state[0]
    head = model.get_output_embeddings()
    scale, softcap = head_transform_from_config(model.config)
    return reference_linear_token_logprobs(
        hidden[n_prompt - 1 : -1],
        head.weight,
        x[0, n_prompt:],
        bias=getattr(head, "bias", None),
        logit_scale=scale,
        softcap=softcap,
    )


def check_family(name: str, config, dtype: torch.dtype, device, opts) -> dict:
    import copy

    from cme_rewards import CMEScorer

    start = time.perf_counter()
    base = build_model(config, device, seed=0)
    model = copy.deepcopy(base).to(dtype)
    model64 = copy.deepcopy(model).double()
    del base
    tok = word_tokenizer(config.vocab_size)
    prompts, responses = samples(config.vocab_size, opts.samples, opts.max_len, seed=1)
    row: dict = {"family": name, "vocab": config.vocab_size, "dtype": str(dtype).split(".")[-1]}
    for impl in ("triton", "torch"):
        scorer = CMEScorer(model=model, tokenizer=tok, impl=impl)
        # one sample per call: the body sees the same shapes as in the references
        results = [
            scorer.score([p], [r], return_token_logprobs=True)[0]
            for p, r in zip(prompts, responses, strict=True)
        ]
        tok_f64, tok_head, cme_f64 = 0.0, 0.0, 0.0
        for prompt, response, result in zip(prompts, responses, results, strict=True):
            if result.error:
                raise RuntimeError(f"{name} {impl}: sample failed: {result.error}")
            x = scorer.encode(prompt, response)
            got = torch.tensor(result.token_logprobs, dtype=torch.float64, device=device)
            with torch.inference_mode():
                want = f64_token_logprobs(model64, x.input_ids, x.n_prompt)
                head = f64_head_token_logprobs(model, x.input_ids, x.n_prompt)
            tok_f64 = max(tok_f64, (got - want).abs().max().item())
            tok_head = max(tok_head, (got - head).abs().max().item())
            cme_f64 = max(cme_f64, abs(result.cme - want.mean().item()))
        row[impl] = {
            "token_vs_f64_forward": tok_f64,
            "token_vs_f64_head": tok_head,
            "cme_vs_f64_forward": cme_f64,
            "n_tokens": sum(r.n_tokens for r in results),
            "scorer_impl": getattr(scorer.options, "impl", None),
        }
    bounds = BOUNDS[row["dtype"]]
    row["bounds"] = bounds
    row["ok"] = all(row["triton"][k] <= v for k, v in bounds.items())
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the rows here after every case")
    parser.add_argument("--dry", action="store_true", help="tiny models on CPU (interpreter)")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--max-len", type=int, default=None)
    parser.add_argument("--families", default="qwen2.5-like,llama3-like,gemma3-like")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    opts = parser.parse_args(argv)
    opts.samples = opts.samples or (2 if opts.dry else 8)
    opts.max_len = opts.max_len or (12 if opts.dry else 160)
    device = torch.device("cpu" if opts.dry else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    configs = family_configs(opts.dry)
    report = {"dry": opts.dry, "bounds": BOUNDS, "rows": []}
    failed = False
    for name in opts.families.split(","):
        for dtype_name in opts.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            try:
                row = check_family(name, configs[name], dtype, device, opts)
            except Exception as exc:
                row = {
                    "family": name,
                    "dtype": dtype_name,
                    "ok": False,
                    "error": f"{type(exc).__name__}: {exc}"[:1000],
                    "traceback": traceback.format_exc()[-3000:],
                }
            failed |= not row["ok"]
            report["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
            if opts.json:
                tmp = opts.json.with_name(opts.json.name + ".tmp")
                tmp.write_text(json.dumps(report, indent=1))
                tmp.replace(opts.json)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
