"""``cme-rewards openrlhf-reward-file``: print the path of the file-mode ``reward_func`` module.

Use it as ``--reward.remote_url "$(cme-rewards openrlhf-reward-file)"`` (OpenRLHF takes a path).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def reward_file_path() -> Path:
    """Absolute path of ``cme_rewards/openrlhf/reward_func.py`` in the installed package."""
    return Path(__file__).resolve().with_name("reward_func.py")


PROBE = (
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "The capital of France is Paris.<|im_end|>",
    "What is the capital of France?",
)
"""(prompt, response, label) of the sample ``--check`` scores."""


def check() -> str:
    """Check every ``CME_REWARDS_*`` variable, load the verifier, score :data:`PROBE` and return a
    summary line. Raises ``ValueError`` (naming the variable) or ``RuntimeError`` (floored probe)."""
    import dataclasses

    from cme_rewards.openrlhf.grouping import GroupOptions
    from cme_rewards.openrlhf.runtime import FileModeConfig, FileModeRuntime

    config = FileModeConfig.load()
    # The probe is a group of one: it must not wait for group members that never come.
    runtime = FileModeRuntime(dataclasses.replace(config, group=GroupOptions()))
    try:
        prompt, response, label = PROBE
        result = runtime.score([prompt + response], [prompt], [label])[0]
    finally:
        runtime.close()
    if result.error is not None:
        raise RuntimeError(f"the probe sample got the floor reward: {result.error}")
    return (
        f"verifier {runtime.config.scorer.verifier!r} scores the probe: cme {result.cme:.4f} nats"
    )


def main(argv: list[str] | None = None) -> int:
    """Print the path; ``--check`` first loads the verifier and scores a probe. Returns 0 or 2."""
    parser = argparse.ArgumentParser(
        prog="cme-rewards openrlhf-reward-file",
        description="Print the path to pass to OpenRLHF's --reward.remote_url (file mode).",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the CME_REWARDS_* variables, load the verifier and score one probe sample",
    )
    args = parser.parse_args(argv)
    if args.check:
        try:
            print(check(), file=sys.stderr)
        except (ValueError, RuntimeError, OSError) as exc:
            print(f"cme-rewards openrlhf-reward-file: error: {exc}", file=sys.stderr)
            return 2
    print(reward_file_path())
    return 0


if __name__ == "__main__":
    sys.exit(main())
