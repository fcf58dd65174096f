"""cme-rewards: Cross-Model Entropy, a label-free reward for GRPO post-training.

CME(x, y) = mean over response tokens of log q(y_t | x_v, y_<t), in nats, under a frozen verifier q.
"""

from cme_rewards.formatting import VerifierInput, build_verifier_input, clean_response
from cme_rewards.models import BUILTIN_VERIFIERS, DEFAULT_VERIFIER, cached_model_dir, load_verifier
from cme_rewards.reductions import grpo_advantages, reduce_token_logprobs
from cme_rewards.results import FLOOR_REWARD, RESULT_FIELDS, CMEResult
from cme_rewards.scorer import CMEScorer

__version__ = "0.1.0"

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
