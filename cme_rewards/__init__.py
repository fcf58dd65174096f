"""cme-rewards: Cross-Model Entropy, a label-free reward for GRPO post-training.

CME(x, y) = mean over response tokens of log q(y_t | x_v, y_<t), in nats, under a frozen verifier q.

The public names below are imported on first use, so ``python -m cme_rewards.winrate`` and other
light entry points start without loading torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_EXPORTS = {
    "CMEScorer": "scorer",
    "CMEResult": "results",
    "FLOOR_REWARD": "results",
    "RESULT_FIELDS": "results",
    "VerifierInput": "formatting",
    "build_verifier_input": "formatting",
    "clean_response": "formatting",
    "BUILTIN_VERIFIERS": "models",
    "DEFAULT_VERIFIER": "models",
    "cached_model_dir": "models",
    "load_verifier": "models",
    "grpo_advantages": "reductions",
    "reduce_token_logprobs": "reductions",
}
__all__ = [
    "BUILTIN_VERIFIERS",
    "DEFAULT_VERIFIER",
    "FLOOR_REWARD",
    "RESULT_FIELDS",
    "CMEResult",
    "CMEScorer",
    "VerifierInput",
    "build_verifier_input",
    "cached_model_dir",
    "clean_response",
    "grpo_advantages",
    "load_verifier",
    "reduce_token_logprobs",
]

if TYPE_CHECKING:
    from cme_rewards.formatting import VerifierInput, build_verifier_input, clean_response
    from cme_rewards.models import (
        BUILTIN_VERIFIERS,
        DEFAULT_VERIFIER,
        cached_model_dir,
        load_verifier,
    )
    from cme_rewards.reductions import grpo_advantages, reduce_token_logprobs
    from cme_rewards.results import FLOOR_REWARD, RESULT_FIELDS, CMEResult
    from cme_rewards.scorer import CMEScorer


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cme_rewards' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"cme_rewards.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
