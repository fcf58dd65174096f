"""``cme-rewards SUBCOMMAND ...``: one entry point dispatching to each part's own ``main``."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "score": ("cme_rewards.score_cli", "score responses in a JSONL file with a verifier"),
    "winrate": ("cme_rewards.winrate.cli", "tie-adjusted win rates with confidence intervals"),
    "judge": ("cme_rewards.judge.cli", "pairwise LLM-as-judge comparisons of two output files"),
    "serve": (
        "cme_rewards.server.cli",
        "HTTP reward server (OpenRLHF protocol and native batch API)",
    ),
    "openrlhf-reward-file": (
        "cme_rewards.openrlhf.cli",
        "print the reward_func file to pass to OpenRLHF's --reward.remote_url",
    ),
    "agreement": (
        "cme_rewards.agreement.cli",
        "does a verifier's reward agree with a judge's preferences? (controls, variants, intervals)",
    ),
    "doctor": (
        "cme_rewards.doctor",
        "versions, framework plugins, and a probe of the verifier on this machine",
    ),
}


def _usage() -> str:
    lines = ["usage: cme-rewards SUBCOMMAND [options]   (cme-rewards SUBCOMMAND --help)", ""]
    lines += [f"  {name:<22} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``cme-rewards``; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] not in SUBCOMMANDS:
        print(f"cme-rewards: unknown subcommand {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
