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
from cme_rewards.openrlhf.protocol import PROMPT_SOURCES, PromptRecovery, load_policy_tokenizer
from cme_rewards.server.security import TOKEN_ENV

logger = logging.getLogger("cme_rewards.server")


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``cme-rewards serve``."""
    p = argparse.ArgumentParser(
        prog="cme-rewards serve",
        description="Serve CME rewards over HTTP (OpenRLHF's /get_reward protocol and a native /score).",
    )
    p.add_argument("--verifier", default="smollm2-135m-instruct", help="verifier name (SPEC.md)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda:0, ...")
    p.add_argument(
        "--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16"
    )
    p.add_argument("--max-length", type=int, default=2048, help="verifier tokens per sample")
    p.add_argument("--reduction", default="mean", choices=["mean", "sum"])
    g = p.add_argument_group("micro-batching")
    g.add_argument(
        "--max-batch-tokens", type=int, default=16384, help="batch size x longest sample"
    )
    g.add_argument("--max-batch-size", type=int, default=64, help="1 turns batching off")
    g.add_argument(
        "--max-wait-ms", type=float, default=10.0, help="how long a sample waits for company"
    )
    g.add_argument("--max-queue", type=int, default=4096, help="queued samples beyond this get 503")
    g.add_argument(
        "--token-budget",
        type=int,
        default=None,
        help="padded tokens per verifier forward (default 2048 on CPU, 16384 on GPU)",
    )
    g = p.add_argument_group("OpenRLHF prompt recovery")
    g.add_argument(
        "--policy-tokenizer",
        default=None,
        help="the policy's tokenizer (name, folder or hub id): strips its chat template and special tokens",
    )
    g.add_argument(
        "--prompt-source",
        default="auto",
        choices=PROMPT_SOURCES,
        help="auto: the label (raw prompt), else the prompt stripped of the policy template, else as is",
    )
    g = p.add_argument_group("safety")
    g.add_argument(
        "--token", default=None, help=f"bearer token (default: ${TOKEN_ENV}; none: open)"
    )
    g.add_argument("--request-timeout", type=float, default=120.0, help="seconds, then 503")
    g.add_argument(
        "--max-body-bytes", type=int, default=4 * 1024 * 1024, help="larger bodies get 413"
    )
    g.add_argument(
        "--graceful-timeout", type=float, default=60.0, help="seconds to finish in-flight requests"
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGINT / SIGTERM (in-flight requests finish first). Returns 0, or 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        limits = BatchLimits(
            max_batch_tokens=args.max_batch_tokens,
            max_batch_size=args.max_batch_size,
            max_wait_ms=args.max_wait_ms,
            max_queue=args.max_queue,
        )
    except ValueError as exc:
        parser.error(f"--{str(exc).split(' ', 1)[0].replace('_', '-')}: {exc}")
    for name in (
        "request_timeout",
        "max_body_bytes",
        "graceful_timeout",
        "max_length",
        "token_budget",
    ):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')}: must be positive")
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if not _is_loopback(args.host) and token is None:
        logger.warning("binding %s without a token: anyone who can reach it can use it", args.host)

    # Heavy imports after argument checks, so `--help` and bad options answer at once.
    import uvicorn

    from cme_rewards.models import resolve_device
    from cme_rewards.scorer import CMEScorer, default_token_budget
    from cme_rewards.server.app import ServerConfig, create_app

    try:
        policy_tokenizer = (
            load_policy_tokenizer(args.policy_tokenizer) if args.policy_tokenizer else None
        )
        recovery = PromptRecovery(policy_tokenizer, args.prompt_source)
    except Exception as exc:
        print(
            f"cme-rewards serve: error: --policy-tokenizer / --prompt-source: {exc}",
            file=sys.stderr,
        )
        return 2
    if (warning := recovery.startup_warning()) is not None:
        logger.warning(warning)
    try:
        budget = args.token_budget or default_token_budget(resolve_device(args.device))
        scorer = CMEScorer(
            args.verifier,
            device=args.device,
            dtype=args.dtype,
            max_length=args.max_length,
            token_budget=budget,
            reduction=args.reduction,
        )
    except Exception as exc:
        print(f"cme-rewards serve: error: --verifier {args.verifier!r}: {exc}", file=sys.stderr)
        return 2
    config = ServerConfig(
        limits=limits,
        request_timeout_s=args.request_timeout,
        max_body_bytes=args.max_body_bytes,
        token=token,
    )
    app = create_app(scorer, recovery, config)
    logger.info(
        "serving %s on http://%s:%d (device %s)",
        scorer.verifier_name,
        args.host,
        args.port,
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
