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


def main(argv: list[str] | None = None) -> int:
    """Print the path; with ``--check``, also validate the ``CME_REWARDS_*`` environment. Returns 0 or 2."""
    parser = argparse.ArgumentParser(
        prog="cme-rewards openrlhf-reward-file",
        description="Print the path to pass to OpenRLHF's --reward.remote_url (file mode).",
    )
    parser.add_argument(
        "--check", action="store_true", help="also check the CME_REWARDS_* environment variables"
    )
    args = parser.parse_args(argv)
    if args.check:
        from cme_rewards.openrlhf.runtime import FileModeConfig

        try:
            FileModeConfig.from_env()
        except ValueError as exc:
            print(f"cme-rewards openrlhf-reward-file: error: {exc}", file=sys.stderr)
            return 2
    print(reward_file_path())
    return 0


if __name__ == "__main__":
    sys.exit(main())
