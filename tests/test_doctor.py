"""``cme-rewards doctor``: versions, the veRL plugin, the adapters, and a real verifier probe."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cme_rewards.doctor import main

CLI = Path(sys.executable).with_name("cme-rewards")


@pytest.mark.slow
def test_doctor_as_the_readme_shows():
    """``cme-rewards doctor`` in this environment (veRL, TRL, OpenRLHF installed): all pass."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_USE_EXTERNAL")}
    proc = subprocess.run(
        [str(CLI), "doctor"], capture_output=True, text=True, env=env, timeout=600
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert re.search(rf"^  torch +{re.escape(torch.__version__)}$", out, re.M)
    assert re.search(r"^  verl +0\.9\.\d+$", out, re.M)
    assert re.search(r"^ok   veRL plugin: .*registers reward manager 'cme'", out, re.M)
    assert re.search(r"^ok   TRL: cme_rewards\.trl imports$", out, re.M)
    assert re.search(r"^ok   OpenRLHF: cme_rewards\.openrlhf\.runtime imports$", out, re.M)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert re.search(
        rf"verifier 'smollm2-135m-instruct' would run on {device}\S* in (bfloat16|float32)", out
    )
    probe = re.search(r"^ok   verifier: scores the probe: cme (-[\d.]+) nats", out, re.M)
    assert probe and -3 < float(probe.group(1)) < 0
    assert out.rstrip().endswith("all checks passed")


@pytest.mark.slow
def test_doctor_json_reports_what_fails(monkeypatch, capsys):
    """A veRL that will not load the plugin and a device that is not here: exit 1, each named."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    monkeypatch.setenv("VERL_USE_EXTERNAL_PLUGINS", "none")
    assert main(["--json", "--device", "cuda", "--dtype", "float32"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert report["verl"]["ok"] is False
    assert "VERL_USE_EXTERNAL_PLUGINS='none'" in report["verl"]["detail"]
    verifier = report["verifier"]
    assert verifier["ok"] is False and (verifier["device"], verifier["dtype"]) == (
        "cuda",
        "float32",
    )
    assert verifier["detail"].startswith("OptionError: --device: 'cuda' asked for, but no CUDA")
    assert report["trl"]["ok"] is True and report["versions"]["trl"] is not None


def test_doctor_names_a_bad_option(capsys):
    assert main(["--dtype", "float8"]) == 2
    assert "cme-rewards doctor: error: --dtype: must be one of auto" in capsys.readouterr().err
