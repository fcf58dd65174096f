"""The command-line tools against hostile and malformed input: ``cme-rewards score`` as a real
process (escaped log lines, the floor under ``--reduction sum``), its input reader, and
``python -m cme_rewards.winrate`` on broken judgment files.

Each test here failed before the tools were hardened (commit 37b2344). ``tests/test_score_cli.py``
holds the cases on options, output paths, NaN and lone surrogates.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cme_rewards.cli import main as cli_main
from cme_rewards.options import ScorerOptions
from cme_rewards.winrate.cli import main as winrate_main

REPO = Path(__file__).resolve().parents[1]
LEGACY = REPO / "tests" / "data" / "winrate" / "legacy_preferences.annotations.json"
FORGED = "CRITICAL cme_rewards: FORGED: the run was tampered with"
SALAD = "Purple seventeen gravel whispers over the quantum teaspoon, " * 4


@pytest.mark.slow
def test_score_process_escapes_ids_in_logs_and_floors_below_every_sum(tmp_path):
    """``--reduction sum``: the fixed floor is -50 nats per token of ``--max-length``, below any
    sum the verifier can give; in a group, the worst member minus the margin. An id with a
    newline is logged escaped, so it cannot forge a log line."""
    evil = f"evil\n{FORGED}\r\u2028"
    rows = [
        {"id": "salad", "prompt": "Say something.", "response": SALAD},
        {"id": "paris", "prompt": "What is the capital of France?", "response": "Paris."},
        {"id": evil, "prompt": "Hi", "response": ""},
        {"id": "g-salad", "group": "g", "prompt": "Say something.", "response": SALAD},
        {"id": "g-empty", "group": "g", "prompt": "Say something.", "response": ""},
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, "-m", "cme_rewards.cli", "score", str(src), "-o", str(dst)]
    cmd += ["--reduction", "sum", "--max-length", "64", "--device", "cpu", "--dtype", "float32"]
    proc = subprocess.run(
        [*cmd, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert not any(line.startswith(FORGED) for line in lines), proc.stderr
    assert any(repr(evil) in line for line in lines), proc.stderr
    out = [json.loads(line) for line in dst.open()]
    assert [o["id"] for o in out] == [r["id"] for r in rows]  # the id itself is kept as it was
    floor = ScorerOptions(reduction="sum", max_length=64).floor_reward()
    scored = [o["cme"] for o in out if o["error"] is None]
    assert floor == -50.0 * 64 and len(scored) == 3
    assert out[2]["error"] == "empty response" and out[2]["cme"] == floor
    assert floor < min(scored) and out[0]["cme"] < -50.0  # a floor of -50 would rank above it
    assert out[4]["cme"] == pytest.approx(out[3]["cme"] - ScorerOptions.floor_margin)
    assert out[4]["cme"] < out[3]["cme"] and out[4]["advantage"] < 0 < out[3]["advantage"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"[" * 100_000, "in.jsonl:2: malformed JSON (nested too deeply)"),
        (b'{"prompt": "Hi", "response": "x", "n": ' + b"9" * 5000 + b"}", "in.jsonl:2: Exceeds"),
        (b'{"prompt": "Hi", "response": "x", "w": -Infinity}', "in.jsonl:2: -Infinity is not"),
    ],
)
def test_score_reader_names_the_line_of_hostile_json(tmp_path, capsys, line, message):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(b'{"prompt": "Hi", "response": "Hello"}\n' + line + b"\n")
    assert cli_main(["score", str(src), "-o", str(dst), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not dst.exists()


def test_score_paths_with_control_characters_are_shown_escaped(tmp_path, capsys):
    src = tmp_path / f"in\n{FORGED}.jsonl"
    src.write_bytes(b'{"prompt": "Hi"}\n')
    assert cli_main(["score", str(src), "-o", str(tmp_path / "o.jsonl"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert repr(str(src)) in err and not any(x.startswith(FORGED) for x in err.splitlines())


# -- python -m cme_rewards.winrate ----------------------------------------------------------------


def annotations(n: int = 4) -> list[dict]:
    return json.loads(LEGACY.read_text())[:n]


def test_winrate_non_utf8_annotations_name_file_and_line(tmp_path, capsys):
    path = tmp_path / "latin1.annotations.json"
    text = json.dumps(annotations(), indent=1, ensure_ascii=False)
    line = text.count("\n", 0, text.index('"instruction"')) + 1
    head, tail = text.split('"instruction": "', 1)
    path.write_bytes(head.encode() + b'"instruction": "caf\xe9 ' + tail.encode())
    assert winrate_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert f"latin1.annotations.json:{line}: not valid UTF-8" in err and "Traceback" not in err


def test_winrate_json_array_followed_by_garbage_is_rejected(tmp_path, capsys):
    path = tmp_path / "trailing.annotations.json"
    path.write_text(json.dumps(annotations(), indent=1) + "\n\n{garbage")
    n_lines = path.read_text().count("\n") + 1
    assert winrate_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert f"trailing.annotations.json:{n_lines}: unexpected text after the JSON array" in err


def test_winrate_error_false_is_a_verdict_not_a_judge_error(tmp_path, capsys):
    rows = [
        {"id": f"p{i}", "model": "m", "baseline": "b", "winner": w, "error": e}
        for i, (w, e) in enumerate(
            [("model", False), ("baseline", None), ("tie", ""), ("model", "no verdict")]
        )
    ]
    path = tmp_path / "j.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert winrate_main([str(path), "--json", "--n-resamples", "200"]) == 0
    (result,) = json.loads(capsys.readouterr().out)["results"]
    assert (result["n_total"], result["n_wins"], result["n_wins_base"], result["n_draws"]) == (
        3,
        1,
        1,
        1,
    )
    assert result["dropped"] == {"judge_error": 1}


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"winner": []}, "field 'winner': unknown label []"),
        ({"winner": None, "preference": 10**400}, "field 'preference': not a number in [1, 2]"),
        ({"model": "m\n" + FORGED}, "field 'model': contains the unprintable character '\\n'"),
        ({"judge": "j\u202eevil"}, "field 'judge': contains the unprintable character"),
        ({"baseline": "b\ud800"}, "field 'baseline': contains the unprintable character"),
        ({"order": ["x"] * 1000}, "field 'order': unknown value ['x', 'x',"),
    ],
)
def test_winrate_hostile_fields_name_line_and_field(tmp_path, capsys, record, message):
    good = {"id": "p", "model": "m", "baseline": "b", "winner": "model"}
    path = tmp_path / "j.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, **record}) + "\n")
    assert winrate_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "j.jsonl: line 2: " + message in err and "Traceback" not in err
    assert len(err) < 1000  # a long value is quoted cut short
