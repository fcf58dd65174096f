"""Write UltraFeedback prompts as veRL parquet files for GRPO with the CME reward.

The paper trains on 5,000 UltraFeedback prompts (no labels: CME needs none). Each row is what veRL's
``RLHFDataset`` reads: ``prompt`` (chat messages; the ``cme`` manager rebuilds them with the
verifier's chat template), ``data_source``, ``reward_model`` (empty ground truth), ``extra_info``.

    python integrations/verl/prepare_ultrafeedback.py --out ~/data/ultrafeedback_cme

Needs the Hugging Face hub (``HuggingFaceH4/ultrafeedback_binarized``), or ``--input FILE.jsonl``
with one ``{"prompt": ...}`` per line for an offline copy.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import datasets

from cme_rewards.io import read_jsonl


def rows(prompts: list[str], split: str) -> list[dict]:
    return [
        {
            "data_source": "ultrafeedback",
            "prompt": [{"role": "user", "content": p}],
            "ability": "chat",
            "reward_model": {"style": "model", "ground_truth": ""},
            "extra_info": {"split": split, "index": i},
        }
        for i, p in enumerate(prompts)
    ]


def load_prompts(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    if args.input:
        prompts = [rec["prompt"] for _, rec in read_jsonl(args.input)]
        unique = list(dict.fromkeys(p for p in prompts if p.strip()))
        random.Random(args.seed).shuffle(unique)
        return unique[: args.train_size], unique[args.train_size : args.train_size + args.val_size]
    train = datasets.load_dataset("HuggingFaceH4/ultrafeedback_binarized", split="train_prefs")
    test = datasets.load_dataset("HuggingFaceH4/ultrafeedback_binarized", split="test_prefs")
    pick = []
    for ds, n in ((train, args.train_size), (test, args.val_size)):
        unique = list(dict.fromkeys(p for p in ds["prompt"] if p.strip()))
        random.Random(args.seed).shuffle(unique)
        pick.append(unique[:n])
    return pick[0], pick[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path.home() / "data" / "ultrafeedback_cme")
    parser.add_argument("--input", type=Path, help="offline JSONL with a 'prompt' field per line")
    parser.add_argument("--train-size", type=int, default=5000)
    parser.add_argument("--val-size", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train, val = load_prompts(args)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, prompts in (("train", train), ("test", val)):
        path = args.out / f"{name}.parquet"
        datasets.Dataset.from_list(rows(prompts, name)).to_parquet(str(path))
        print(f"{path}: {len(prompts)} prompts")


if __name__ == "__main__":
    main()
