"""Win rates of pairwise judgments, with prompts as the unit of uncertainty.

from cme_rewards.winrate import load_judgments, compare, Settings
results = compare(load_judgments(["claude-2.1.annotations.json"]), Settings(seed=0))
results[0].tie_adjusted.confidence_interval   # BCa, percent
"""

from cme_rewards.winrate.load import Judgment, Judgments, load_judgments, parse_preference
from cme_rewards.winrate.results import (
    ComparisonResult,
    ConfidenceInterval,
    Estimate,
    PositionResult,
    SignTestResult,
)
from cme_rewards.winrate.stats import POOLED, Settings, compare

__all__ = [
    "POOLED",
    "ComparisonResult",
    "ConfidenceInterval",
    "Estimate",
    "Judgment",
    "Judgments",
    "PositionResult",
    "Settings",
    "SignTestResult",
    "compare",
    "load_judgments",
    "parse_preference",
]
