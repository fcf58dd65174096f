"""Scorer throughput: the hand-written scorer, the scorer as it was, each optimisation alone, all together.

One run, the same inputs and token ids for every method, each method in its own subprocess (so
its peak memory is its own). Methods:

- ``hand_written``: what a user writes: batches of 8 samples right-padded to the longest, a full
  forward (logits at every position), ``log_softmax(logits.float())``, gather, masked mean; in
  the weights' dtype of ``--baseline-dtype`` (float32 on CPU, bfloat16 on CUDA).
- ``before``: the scorer as it was before these optimisations (float32 on CPU, every sample its
  own row, length-sorted micro-batches, output head at scored rows only):
  ``CMEScorer(dtype="float32", share_prefix=False)``.
- ``bf16``: ``before`` with bf16 weights (``dtype="bfloat16"``).
- ``share_prefix``: ``before`` with each group's prompt computed once (``share_prefix=True``).
- ``all``: the defaults, ``dtype="auto"`` (bf16 where the hardware multiplies it natively) and
  ``share_prefix=True``.

Batches: (a) 8 prompts x 8 responses, prompt 256 tokens, response 512; (b) 16 AlpacaEval
instructions x 8 AlpacaEval answers (lengths as they come); (c) 4 prompts of 1,024 tokens x 8
responses of 128. Figures: response tokens scored per second (best of ``--repeats``), peak extra
memory (CPU: resident memory sampled every 5 ms above the level before the call; CUDA:
``max_memory_allocated`` above the level before), padded tokens per real token, and the largest
reward difference against ``before`` (float32) and, for batch (b), against a float64 forward
(``dtype="float64"``), with the share of within-group pairs whose order float64 keeps.

    python benchmarks/bench_scorer.py                          # CPU, real SmolLM2 weights
    python benchmarks/bench_scorer.py --device cuda --config qwen2.5-0.5b   # random weights
    python benchmarks/bench_scorer.py --config tiny --batches c --repeats 1  # plumbing check
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

METHODS = {
    "hand_written": None,
    "before": {"dtype": "float32", "share_prefix": False},
    "bf16": {"dtype": "bfloat16", "share_prefix": False},
    "share_prefix": {"dtype": "float32", "share_prefix": True},
    "all": {"dtype": "auto", "share_prefix": True},
}
REFERENCE = {"float64": {"dtype": "float64", "share_prefix": False}}
CONFIGS = {
    # Random-weight verifiers whose speed matches the real models (weights cannot travel).
    "qwen2.5-0.5b": dict(
        arch="Qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
    ),
    "llama-3.2-1b": dict(
        arch="Llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
    ),
    "tiny": dict(
        arch="Llama", vocab_size=49152, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    ),
}  # fmt: skip
TOKENIZER = "smollm2-135m-instruct"  # its ids (< 49,152) are valid in every config above


# -- inputs -------------------------------------------------------------------------------------------


def alpaca_texts() -> tuple[list[str], list[str]]:
    """(instructions, answers) of the AlpacaEval annotation files beside the checkout, or the
    shipped example pairs when they are absent."""
    import jsonlines

    shared = REPO.parent / "shared" / "data" / "alpaca_eval"
    if shared.is_dir():
        instructions, answers = [], []
        for path in sorted(shared.glob("*.annotations.json")):
            for record in json.loads(path.read_text()):
                instructions.append(record["instruction"])
                answers += [record["output_1"], record["output_2"]]
        return sorted(set(instructions)), answers
    rows = list(jsonlines.open(REPO / "examples" / "alpaca_pairs.jsonl"))
    return sorted({r["prompt"] for r in rows}), [r["response"] for r in rows]


def cut_text(tokenizer, text: str, n_tokens: int) -> str:
    """``text`` repeated as needed and cut to about ``n_tokens`` tokens."""
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += tokenizer(text + "\n", add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[:n_tokens])


def make_batch(name: str, tokenizer) -> tuple[list[str], list[str]]:
    """(prompts, responses) of batch ``a``, ``b`` or ``c`` (seeded; 8 responses per prompt)."""
    rng = random.Random(0)
    instructions, answers = alpaca_texts()
    long_text = " ".join(answers[:40])
    if name == "b":
        prompts = rng.sample(instructions, 16)
        responses = [rng.choice(answers) for _ in range(16 * 8)]
        return [p for p in prompts for _ in range(8)], responses
    n_prompts, p_len, r_len = (8, 256, 512) if name == "a" else (4, 1024, 128)
    prompts, responses = [], []
    for k in range(n_prompts):
        prompt = cut_text(tokenizer, f"Question {k}. " + instructions[k] + " " + long_text, p_len)
        for _ in range(8):
            start = rng.randrange(len(answers))
            responses.append(cut_text(tokenizer, " ".join(answers[start : start + 3]), r_len))
            prompts.append(prompt)
    return prompts, responses


# -- one method, in a child process -----------------------------------------------------------------


class PeakRSS:
    """Resident memory sampled every 5 ms on a thread, as a context manager: ``.peak_mib``."""

    def __init__(self) -> None:
        self.peak_mib = self.now()
        self._stop = threading.Event()

    @staticmethod
    def now() -> float:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize() / 2**20

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_mib = max(self.peak_mib, self.now())

    def __enter__(self) -> PeakRSS:
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, self.now())


def hand_written(model, inputs, batch_size: int = 8) -> list[float]:
    """The baseline: padded batches of 8, full logits, float32 log-softmax, gather, masked mean."""
    out = []
    device = next(model.parameters()).device
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start : start + batch_size]
        width = max(len(x.input_ids) for x in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        attn = torch.zeros_like(ids)
        scored = torch.zeros((len(batch), width), dtype=torch.bool)
        for b, x in enumerate(batch):
            ids[b, : len(x.input_ids)] = torch.tensor(x.input_ids)
            attn[b, : len(x.input_ids)] = 1
            scored[b, x.n_prompt : len(x.input_ids)] = True
        ids, attn, scored = ids.to(device), attn.to(device), scored.to(device)
        logits = model(input_ids=ids, attention_mask=attn).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        token_lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        mask = scored[:, 1:].float()
        out += ((token_lp * mask).sum(-1) / mask.sum(-1)).tolist()
    return out


def load(config: str | None, device: str, dtype: str, tokenizer_dir: str | None = None):
    """(model, tokenizer): the real SmolLM2 weights, or a random-weight model of ``config`` with
    SmolLM2's tokenizer (from ``tokenizer_dir`` where the verifier package is absent, e.g. on the
    GPU machine: ``--save-tokenizer DIR`` writes it here)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from cme_rewards.models import cached_model_dir, load_verifier, resolve_dtype

    if config is None:
        return load_verifier(TOKENIZER, device=device, dtype=dtype)
    spec = dict(CONFIGS[config])
    cfg = AutoConfig.for_model(spec.pop("arch").lower(), **spec)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: seconds, not a minute, on a GPU
        model = AutoModelForCausalLM.from_config(
            cfg, dtype=resolve_dtype(dtype, torch.device(device))
        )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or cached_model_dir(TOKENIZER))
    return model.eval(), tokenizer


def run_method(args: argparse.Namespace) -> dict:
    """Child: score one batch with one method ``--repeats`` times; report figures and values."""
    from cme_rewards import CMEScorer

    device = torch.device(args.device)
    options = {**METHODS, **REFERENCE}.get(args.method) or {
        "dtype": args.baseline_dtype,
        "share_prefix": False,
    }
    model, tokenizer = load(args.config, args.device, options["dtype"], args.tokenizer)
    scorer = CMEScorer(model=model, tokenizer=tokenizer, **options)
    prompts, responses = make_batch(args.batch, tokenizer)
    groups = prompts
    inputs = [scorer.encode(p, r) for p, r in zip(prompts, responses, strict=True)]
    if args.method == "hand_written":
        call = lambda: hand_written(model, inputs)  # noqa: E731
    else:
        call = lambda: [r.cme for r in scorer.score(prompts, responses, groups=groups)]  # noqa: E731
    with torch.inference_mode():
        scorer.score(prompts[:2], responses[:2])  # warm-up (kernels, allocator)
        times, peak = [], 0.0
        for _ in range(1 if args.method in REFERENCE else args.repeats):  # values, not speed
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            start_rss = PeakRSS.now()
            with PeakRSS() as rss:
                t0 = time.perf_counter()
                values = call()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            if device.type == "cuda":
                peak = max(peak, (torch.cuda.max_memory_allocated() - before) / 2**20)
            else:
                peak = max(peak, rss.peak_mib - start_rss)
    scored = sum(x.n_scored for x in inputs)
    real = sum(len(x.input_ids) for x in inputs)
    return {
        "method": args.method,
        "batch": args.batch,
        "values": values,
        "seconds": times,
        "response_tokens": scored,
        "tokens_per_s": scored / min(times),
        "extra_peak_mib": peak,
        "real_tokens": real,
        "dtype": str(next(model.parameters()).dtype),
    }


def child(method: str, batch: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--batch-name", batch]
    cmd += ["--device", args.device, "--repeats", str(args.repeats)]
    cmd += ["--baseline-dtype", args.baseline_dtype]
    if args.config:
        cmd += ["--config", args.config]
    if args.tokenizer:
        cmd += ["--tokenizer", args.tokenizer]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{method} on ({batch}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the whole run ------------------------------------------------------------------------------------


def order_kept(values: list[float], reference: list[float], group_size: int = 8) -> float:
    """Share of within-group pairs that ``values`` orders as ``reference`` does."""
    kept = total = 0
    for g in range(0, len(values), group_size):
        for i in range(g, g + group_size):
            for j in range(i + 1, g + group_size):
                total += 1
                kept += (values[i] - values[j]) * (reference[i] - reference[j]) > 0
    return kept / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--config", choices=sorted(CONFIGS), help="random-weight model config")
    parser.add_argument("--batches", default="a,b,c")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline-dtype", default=None, help="float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--no-float64", action="store_true", help="skip the float64 reference")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--tokenizer", help="folder of SmolLM2's tokenizer (random configs)")
    parser.add_argument("--save-tokenizer", metavar="DIR", help="write that folder and exit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--batch-name", dest="batch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.baseline_dtype = args.baseline_dtype or ("float32" if args.device == "cpu" else "bfloat16")
    if args.save_tokenizer:
        from transformers import AutoTokenizer

        from cme_rewards.models import cached_model_dir  # converts the GGUF once

        AutoTokenizer.from_pretrained(cached_model_dir(TOKENIZER)).save_pretrained(
            args.save_tokenizer
        )
        return
    if args.child:
        args.method = args.child
        print(json.dumps(run_method(args)))
        return
    from machine import describe_machine

    name = args.config or "smollm2-135m-instruct"
    out = args.out or REPO / "benchmarks" / "results" / f"scorer_{args.device}_{name}.json"
    result = {
        "benchmark": "scorer throughput: hand-written vs before vs each optimisation vs all",
        "command": "python benchmarks/bench_scorer.py " + " ".join(sys.argv[1:]),
        "machine": describe_machine(),
        "verifier": name,
        "weights": "real" if args.config is None else "random (speed does not depend on them)",
        "batches": {},
    }
    methods = args.methods.split(",")
    for batch in args.batches.split(","):
        rows = {m: child(m, batch, args) for m in methods}
        before = rows.get("before")
        summary = {}
        for m, row in rows.items():
            summary[m] = {
                "tokens_per_s": row["tokens_per_s"],
                "seconds": row["seconds"],
                "extra_peak_mib": row["extra_peak_mib"],
                "dtype": row["dtype"],
            }
            if before is not None:
                summary[m]["speedup_vs_before"] = row["tokens_per_s"] / before["tokens_per_s"]
                summary[m]["max_abs_diff_vs_before_nats"] = max(
                    abs(a - b) for a, b in zip(row["values"], before["values"], strict=True)
                )
            if "hand_written" in rows:
                base = rows["hand_written"]
                summary[m]["speedup_vs_hand_written"] = row["tokens_per_s"] / base["tokens_per_s"]
                summary[m]["memory_vs_hand_written"] = row["extra_peak_mib"] / max(
                    base["extra_peak_mib"], 1e-9
                )
        entry = {
            "response_tokens": next(iter(rows.values()))["response_tokens"],
            "methods": summary,
        }
        if batch == "b" and not args.no_float64 and args.device == "cpu":
            ref = child("float64", batch, args)
            for m in ("bf16", "all"):
                if m in rows:
                    diffs = sorted(
                        abs(a - b) for a, b in zip(rows[m]["values"], ref["values"], strict=True)
                    )
                    entry["methods"][m].update(
                        max_abs_diff_vs_float64_nats=diffs[-1],
                        mean_abs_diff_vs_float64_nats=sum(diffs) / len(diffs),
                        p95_abs_diff_vs_float64_nats=diffs[int(0.95 * (len(diffs) - 1))],
                        share_within_5e3_of_float64=sum(d <= 5e-3 for d in diffs) / len(diffs),
                        group_order_kept_vs_float64=order_kept(rows[m]["values"], ref["values"]),
                    )
        result["batches"][batch] = entry
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")  # after every batch: nothing lost
        print(json.dumps({batch: entry}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
