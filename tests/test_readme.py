"""Every command in README.md's ``bash`` blocks is run by a test, as written.

This file runs the ones no other test runs (the first command's scoring, the judge and win-rate
pair, the reward server); for the others it names the test that runs them, and fails when the
README shows a command nobody runs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cme_rewards.server.background import free_port

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
CLI = Path(sys.executable).with_name("cme-rewards")

RUN_ELSEWHERE = {
    # command prefix -> the test that runs it as written
    "bash scripts/setup.sh && .venv/bin/python -m pytest -q": ".ci/run (CI itself)",
    "python -m verl.trainer.main_ppo": "test_verl_settings.py::test_every_documented_main_ppo_command_composes",
    "python integrations/trl/train_grpo_cme.py": "test_trl.py::test_grpo_readme_command_instruct_policy_text_prompts",
    "cme-rewards openrlhf-reward-file --check": "test_openrlhf.py (the launch script's --check, as a process)",
    "cme-rewards doctor": "test_doctor.py::test_doctor_as_the_readme_shows",
    "cme-rewards agreement": "test_agreement.py (the README's command on the committed fixture)",
    "pip install": "test_readme.py::test_installed_extras_exist",
}  # fmt: skip
RUN_HERE = (
    "bash scripts/setup.sh && .venv/bin/cme-rewards score",
    "cme-rewards judge",
    "python -m cme_rewards.winrate",
    "cme-rewards serve",
)


def readme_commands() -> list[str]:
    """Each command of the README's ``bash`` blocks (continuation lines joined, comments dropped)."""
    out: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.DOTALL):
        current = ""
        for line in block.splitlines():
            if not current and line.lstrip().startswith("#"):
                continue
            current += line.split(" # ")[0].strip().removesuffix("\\").strip() + " "
            if not line.rstrip().endswith("\\"):
                out.append(current.strip())
                current = ""
    return [c for c in out if c]


def command(prefix: str) -> str:
    """The README's command starting with ``prefix`` (exactly one)."""
    found = [c for c in readme_commands() if c.startswith(prefix)]
    assert len(found) == 1, (prefix, found)
    return found[0]


def test_every_readme_command_is_run_by_some_test():
    for cmd in readme_commands():
        assert cmd.startswith(RUN_HERE) or cmd.startswith(tuple(RUN_ELSEWHERE)), (
            f"README command run by no test: {cmd}"
        )
    trl = importlib_trl_command()
    assert trl in readme_commands(), "the TRL test runs a command the README no longer shows"


def importlib_trl_command() -> str:
    from test_trl import TRL_COMMAND

    return TRL_COMMAND


def test_installed_extras_exist():
    """``pip install "cme-rewards[X]"`` in the README names extras pyproject.toml declares."""
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    named = re.findall(r'pip install "cme-rewards\[(\w+)\]"', README)
    assert named and all(name in extras for name in named)


def run_in(workdir: Path, cmd: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a README command in ``workdir`` with this environment's console scripts on PATH."""
    env = {**os.environ, "PATH": f"{CLI.parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        cmd, shell=True, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout
    )


def linked_checkout(tmp_path: Path) -> Path:
    """A folder that looks like the checkout for relative paths (examples/, tests/data/, .venv)."""
    for name in ("examples", "tests", ".venv"):
        (tmp_path / name).symlink_to(REPO / name if name != ".venv" else CLI.parent.parent)
    return tmp_path


@pytest.mark.slow
def test_first_command_scores_the_example(tmp_path):
    cmd = command("bash scripts/setup.sh && .venv/bin/cme-rewards score")
    _, score = cmd.split(" && ", 1)  # the set-up half is what .ci/run runs first
    proc = run_in(linked_checkout(tmp_path), score)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "scored.jsonl").open()]
    example = [json.loads(line) for line in (REPO / "examples" / "alpaca_pairs.jsonl").open()]
    assert len(rows) == len(example) and all(r["error"] is None for r in rows)
    assert all(-20 < r["cme"] < 0 and r["n_tokens"] > 0 for r in rows)
    assert "scored 40 samples with smollm2-135m-instruct" in proc.stderr


@pytest.mark.slow
def test_judge_then_win_rate(tmp_path):
    workdir = linked_checkout(tmp_path)
    judge = run_in(workdir, command("cme-rewards judge"))
    assert judge.returncode == 0, judge.stderr[-2000:]
    judgments = [json.loads(line) for line in (tmp_path / "judgments.jsonl").open()]
    assert len(judgments) == 8 and {j["order"] for j in judgments} == {
        "model_first",
        "baseline_first",
    }
    winrate = run_in(workdir, command("python -m cme_rewards.winrate"))
    assert winrate.returncode == 0, winrate.stderr[-2000:]
    assert (tmp_path / "forest.png").stat().st_size > 1000
    assert "smollm2-135m-instruct" in winrate.stdout and "claude-2.1" in winrate.stdout


@pytest.mark.slow
def test_reward_server_command_serves(tmp_path):
    port = free_port()
    args = shlex.split(command("cme-rewards serve")) + ["--port", str(port)]
    proc = subprocess.Popen(
        [str(CLI), *args[1:]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.25)
        body = {"samples": [{"prompt": "What is the capital of France?", "response": "Paris."}]}
        reply = httpx.post(f"http://127.0.0.1:{port}/score", json=body, timeout=120).json()
        assert reply["results"][0]["error"] is None and reply["results"][0]["cme"] < 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
