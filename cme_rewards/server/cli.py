"""``cme-rewards serve``: run the reward server with uvicorn.

Example::

    cme-rewards serve --verifier smollm2-135m-instruct --policy-tokenizer Qwen/Qwen2.5-0.5B-Instruct
    # OpenRLHF: --reward.remote_url http://127.0.0.1:5000/get_reward --data.label_key <raw prompt column>
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

from cme_rewards.batching import BatchLimits
from cme_rewards.openrlhf.protocol import RecoveryOptions
from cme_rewards.options import OptionError, ScorerOptions, add_arguments, flag, from_values
from cme_rewards.server.options import ServerOptions
from cme_rewards.server.security import TOKEN_ENV

logger = logging.getLogger("cme_rewards.server")

OPTION_GROUPS = (
    ("verifier and scoring", ScorerOptions),
    ("micro-batching", BatchLimits),
    ("OpenRLHF prompt recovery", RecoveryOptions),
    ("requests and safety", ServerOptions),
)


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``cme-rewards serve``: every option class's flags, plus where to listen."""
    p = argparse.ArgumentParser(
        prog="cme-rewards serve",
        description="Serve CME rewards over HTTP (OpenRLHF's /get_reward protocol and a native /score).",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address [default: loopback only]")
    p.add_argument("--port", type=int, default=5000, help="[default: 5000]")
    p.add_argument(
        "--graceful-timeout",
        type=float,
        default=60.0,
        help="seconds to finish in-flight requests on SIGTERM [default: 60]",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    for title, cls in OPTION_GROUPS:
        add_arguments(p.add_argument_group(title), cls)
    return p


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_options(
    args: argparse.Namespace,
) -> tuple[ScorerOptions, BatchLimits, RecoveryOptions, ServerOptions]:
    """The four option objects from parsed flags; :class:`OptionError` names the flag."""
    classes = tuple(cls for _, cls in OPTION_GROUPS)
    names = {f for cls in classes for f in cls.__dataclass_fields__}
    given = {n: v for n, v in vars(args).items() if n in names and v is not None}
    if "token" not in given and os.environ.get(TOKEN_ENV):
        given["token"] = os.environ[TOKEN_ENV]
    scorer, limits, recovery, server = from_values(classes, given, flag, strings=True)
    scorer.check_here(flag)
    # Unless --max-samples is given, a smaller --max-queue also bounds the samples of a request.
    if "max_samples" in given and server.max_samples > limits.max_queue:
        raise OptionError(
            flag("max_samples"),
            f"{server.max_samples} is more than --max-queue {limits.max_queue}: such a request "
            "could never be queued",
        )
    return scorer, limits, recovery, server


def _error(message: str) -> int:
    print(f"cme-rewards serve: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGINT / SIGTERM (in-flight requests finish first). Returns 0, or 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.graceful_timeout <= 0:
            raise OptionError(
                "--graceful-timeout", f"must be greater than 0, got {args.graceful_timeout}"
            )
        options, limits, recovery_options, server_options = parse_options(args)
    except OptionError as exc:
        return _error(str(exc))
    if not _is_loopback(args.host) and server_options.token is None:
        logger.warning("binding %r without a token: anyone who can reach it can use it", args.host)

    # Heavy imports after argument checks, so `--help` and bad options answer at once.
    import uvicorn

    from cme_rewards.scorer import CMEScorer
    from cme_rewards.server.app import ServerConfig, create_app

    try:
        recovery = recovery_options.build()
    except Exception as exc:
        return _error(f"--policy-tokenizer {recovery_options.policy_tokenizer!r}: {exc}")
    try:
        scorer = CMEScorer(options=options)
    except (OptionError, OSError) as exc:
        return _error(f"--verifier {options.verifier!r}: {exc}")
    app = create_app(scorer, recovery, ServerConfig(limits=limits, server=server_options))
    logger.info(
        "serving %r on %r (device %s)",
        scorer.verifier_name,
        f"http://{args.host}:{args.port}",
        scorer.device,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,  # the URL may carry ?token=
        timeout_graceful_shutdown=args.graceful_timeout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
