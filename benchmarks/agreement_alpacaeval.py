"""Does CME agree with GPT-4-turbo on AlpacaEval 2.0? The run behind docs/agreement.md.

Runs ``cme-rewards agreement`` on the three shared AlpacaEval annotation files (200 seeded prompts
each) with SmolLM2-135M-Instruct, Gemma-3-270M and the random-weight controls of both, every
variant, and adds what the style hypothesis needs: per file and verifier, the mean CME (nats per
token) and length (verifier tokens) of each generator's answers, and how often CME prefers the
second answer among the pairs the judge gives to the second and among those it gives to the first.

    python benchmarks/agreement_alpacaeval.py [--sample 200] [--cache DIR]

Writes ``benchmarks/results/agreement.json`` (the CLI's ``--json`` document plus ``generators``,
the command and the machine) and ``agreement.png``. Token log-probs come from the agreement cache,
so a rerun scores nothing twice (about 40 minutes of scoring on a quiet 2-core CPU the first time).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

SHARED = REPO.parent / "shared" / "data" / "alpaca_eval"
FILES = ("claude-2.1", "gpt-3.5-turbo-1106", "OpenHermes-2.5-Mistral-7B")
VERIFIERS = ("smollm2-135m-instruct", "gemma3-270m")


def generator_figures(paths: list[str], sample: int, cache: str) -> list[dict]:
    """Per file x verifier: each generator's mean CME and length, and CME's preference split by
    the judge's verdict (all from the cache the CLI run just filled)."""
    from cme_rewards.agreement.cache import score_texts
    from cme_rewards.agreement.pairs import load_pairs, sample_prompts
    from cme_rewards.options import ScorerOptions

    files = sample_prompts([load_pairs(p) for p in paths], sample, 0)
    out = []
    for verifier in VERIFIERS:
        options = ScorerOptions(verifier=verifier)
        for f in files:
            pairs = [p for p in f.pairs if p.decided]
            sides = [
                score_texts(options, texts, cache_dir=cache, progress=False)
                for texts in (
                    [(p.instruction, p.first) for p in pairs],
                    [(p.instruction, p.second) for p in pairs],
                )
            ]
            scored = [a.token_logprobs is not None and b.token_logprobs is not None
                      for a, b in zip(*sides, strict=True)]  # fmt: skip
            pairs = [p for p, ok in zip(pairs, scored, strict=True) if ok]  # floored: left out
            sides = [[s for s, ok in zip(side, scored, strict=True) if ok] for side in sides]
            cme = [np.array([s.token_logprobs.mean() for s in side]) for side in sides]
            tokens = [np.array([s.n_tokens for s in side]) for side in sides]
            judge_second = np.array([p.preference > 1.5 for p in pairs])
            second = cme[1] > cme[0]
            out.append(
                {
                    "file": f.label,
                    "verifier": verifier,
                    "first_generator": pairs[0].baseline,
                    "second_generator": pairs[0].model,
                    "cme_first": round(float(cme[0].mean()), 4),
                    "cme_second": round(float(cme[1].mean()), 4),
                    "tokens_first": round(float(tokens[0].mean()), 1),
                    "tokens_second": round(float(tokens[1].mean()), 1),
                    "cme_prefers_second_when_judge_does": round(
                        100 * float(second[judge_second].mean()), 1
                    ),
                    "cme_prefers_second_when_judge_prefers_first": round(
                        100 * float(second[~judge_second].mean()), 1
                    ),
                }
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=int, default=200)
    parser.add_argument("--cache", help="agreement cache [~/.cache/cme_rewards/agreement]")
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "agreement.json"
    )
    args = parser.parse_args()
    from machine import describe_machine

    from cme_rewards.agreement.cli import main as agreement
    from cme_rewards.models import cache_root

    cache = args.cache or str(cache_root() / "agreement")
    paths = [str(SHARED / f"{name}.annotations.json") for name in FILES]
    argv = [*paths, "--sample", str(args.sample), "--seed", "0", "--json"]
    if args.cache:
        argv += ["--cache", args.cache]
    for verifier in VERIFIERS:
        argv += ["--verifier", verifier]
    for verifier in VERIFIERS:
        argv += ["--verifier", f"random:{verifier}"]
    argv += ["--plot", str(args.out.with_suffix(".png"))]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = agreement(argv)
    if rc != 0:
        raise SystemExit(rc)
    document = json.loads(printed.getvalue())
    document["generators"] = generator_figures(paths, args.sample, cache)
    document["command"] = "cme-rewards agreement " + " ".join(
        a.replace(str(REPO) + "/", "").replace(str(REPO.parent) + "/", "../") for a in argv
    )
    document["machine"] = describe_machine()
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=1, allow_nan=False) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
