"""Does a verifier's reward agree with a strong judge? Agreement, rank correlations and controls.

from cme_rewards.agreement import load_pairs, measure
from cme_rewards.options import ScorerOptions
files = [load_pairs("claude-2.1.annotations.json")]
report = measure(files, ["smollm2-135m-instruct"], ScorerOptions(), cache_dir="agreement-cache")
report.rows[0].result.agreement, report.rows[0].result.agreement_ci   # percent, BCa over prompts

The command line is ``cme-rewards agreement`` (:mod:`cme_rewards.agreement.cli`); the method and
the results on AlpacaEval are in ``docs/agreement.md``.
"""

from cme_rewards.agreement.measure import (
    CONTROLS,
    VARIANTS,
    AgreementReport,
    FileSummary,
    Row,
    measure,
)
from cme_rewards.agreement.pairs import Pair, PairFile, load_pairs, sample_prompts
from cme_rewards.agreement.stats import AgreementResult, LengthBin, agreement_stats

__all__ = [
    "CONTROLS",
    "VARIANTS",
    "AgreementReport",
    "AgreementResult",
    "FileSummary",
    "LengthBin",
    "Pair",
    "PairFile",
    "Row",
    "agreement_stats",
    "load_pairs",
    "measure",
    "sample_prompts",
]
