"""Options of the reward server itself (the verifier's are ``ScorerOptions``)."""

from __future__ import annotations

from dataclasses import dataclass

from cme_rewards.options import CheckedOptions, above, at_least, option


@dataclass(frozen=True)
class ServerOptions(CheckedOptions):
    """Server behaviour apart from the verifier and the batch limits."""

    request_timeout: float = option(
        120.0,
        "a request not answered within this time gets 503; keep it below OpenRLHF's 180 s",
        unit="s",
        check=above(0),
    )
    max_body_bytes: int = option(
        4 * 1024 * 1024, "larger request bodies get 413", unit="bytes", check=at_least(1)
    )
    max_samples: int = option(
        1024, "most samples in one request; more get 413", unit="samples", check=at_least(1)
    )
    token: str | None = option(
        None, "bearer token required on every endpoint but /health (default $CME_REWARDS_TOKEN)"
    )
    docs: bool = option(False, "serve /docs and /openapi.json (behind the token)")
