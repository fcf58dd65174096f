"""Pairwise LLM-as-judge: judge prompt, server and local backends, resumable runs, calibration.

from cme_rewards.judge import LocalJudge, make_tasks, pairs_from_outputs, run_judge
tasks = make_tasks(pairs_from_outputs("model.jsonl", "base.jsonl"), orders="both")
run_judge(tasks, LocalJudge("smollm2-135m-instruct"), "judgments.jsonl")
"""

from cme_rewards.judge.backends import JudgeUnavailableError, LocalJudge, OpenAIJudge, Verdict
from cme_rewards.judge.calibrate import CalibrationResult, calibrate
from cme_rewards.judge.pairs import (
    Pair,
    Task,
    make_tasks,
    pairs_from_annotations,
    pairs_from_outputs,
)
from cme_rewards.judge.prompt import build_messages, parse_verdict
from cme_rewards.judge.runner import run_judge

__all__ = [
    "CalibrationResult",
    "JudgeUnavailableError",
    "LocalJudge",
    "OpenAIJudge",
    "Pair",
    "Task",
    "Verdict",
    "build_messages",
    "calibrate",
    "make_tasks",
    "pairs_from_annotations",
    "pairs_from_outputs",
    "parse_verdict",
    "run_judge",
]
