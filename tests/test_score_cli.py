"""``cme-rewards score``: real verifiers against a plain float64 transformers forward, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import jsonlines
import pytest
import torch
from conftest import EXAMPLES
from transformers import AutoModelForCausalLM, AutoTokenizer

from cme_rewards import cached_model_dir
from cme_rewards.cli import main as cli_main
from cme_rewards.formatting import build_group_inputs
from cme_rewards.ops.reference import reference_token_logprobs

# Verifier token budgets that keep the float64 reference forward quick on 2 CPU cores (Gemma's
# 262,144-word output head costs 100 GFLOP per 300 tokens in float64).
MAX_LENGTH = {"smollm2-135m-instruct": 128, "gemma3-270m": 128}


def alpaca_pairs(shared: Path | None) -> list[dict]:
    """20 AlpacaEval instructions with both answers: from ../shared when present, else the example."""
    if shared is None:
        return list(jsonlines.open(EXAMPLES / "alpaca_pairs.jsonl"))
    records = json.loads((shared / "alpaca_eval" / "claude-2.1.annotations.json").read_text())[:20]
    return [
        {"id": f"{i}-{key}", "group": i, "prompt": r["instruction"], "response": r[key]}
        for i, r in enumerate(records)
        for key in ("output_1", "output_2")
    ]


def float64_reference(
    folder: Path, rows: list[dict], tokenizer, max_length: int
) -> list[tuple[float, list[int]]]:
    """Plain transformers float64 forward over the ids the scorer should build: (cme, scored ids).

    Responses to the same prompt share one prompt, cut once for the longest of them when the
    group is over ``max_length`` (the documented rule of ``build_group_inputs``)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    out = []
    with torch.inference_mode():
        for row in rows:
            siblings = [r for r in rows if r["prompt"] == row["prompt"]]
            x = build_group_inputs(
                tokenizer,
                row["prompt"],
                [r["response"] for r in siblings],
                max_length=max_length,
            )[siblings.index(row)]
            n = x.n_scored
            logits = model(torch.tensor([x.input_ids]), logits_to_keep=n + 1).logits[0, :-1]
            lp = reference_token_logprobs(logits, torch.tensor(x.input_ids[-n:]))
            out.append((float(lp.mean()), x.input_ids[-n:]))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("verifier", ["smollm2-135m-instruct", "gemma3-270m"])
def test_score_cli_matches_float64_forward(tmp_path, verifier):
    from conftest import shared_data_dir

    rows = alpaca_pairs(shared_data_dir())
    assert len({r["prompt"] for r in rows}) >= 20 and len(rows) >= 40
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    with jsonlines.open(src, "w") as w:
        w.write_all(rows)
    assert (
        cli_main(
            [
                "score",
                str(src),
                "-o",
                str(dst),
                "--verifier",
                verifier,
                "--max-length",
                str(MAX_LENGTH[verifier]),
                "--device",
                "cpu",
                "--dtype",
                "float32",
                "--no-progress",
            ]
        )
        == 0
    )
    scored = list(jsonlines.open(dst))
    folder = cached_model_dir(verifier)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reference = float64_reference(folder, rows, tokenizer, MAX_LENGTH[verifier])
    for row, out, (cme64, ids) in zip(rows, scored, reference, strict=True):
        assert {k: out[k] for k in row} == row  # every input field kept
        assert out["error"] is None and out["n_tokens"] == len(ids)
        assert abs(out["cme"] - cme64) < 1e-4, row["id"]
        if out["truncated"]:  # the response was cut: its scored tokens are its first ones
            assert row["response"].startswith(tokenizer.decode(ids[:-1]).rstrip("\ufffd"))
        else:
            assert tokenizer.decode(ids) == row["response"]
    for group in {r["group"] for r in rows}:
        pair = [o for o in scored if o["group"] == group]
        assert pair[0]["advantage"] == pytest.approx(-pair[1]["advantage"], abs=1e-9)


def _run(tmp_path: Path, lines: list[bytes]) -> tuple[int, Path]:
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    dst.write_text("previous results\n")
    return cli_main(["score", str(src), "-o", str(dst), "--no-progress"]), dst


GOOD = b'{"prompt": "Hi", "response": "Hello"}'


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        (b'{"prompt": "Hi", "response": "Hello"', "in.jsonl:2: malformed JSON"),
        (b'["not", "an", "object"]', "in.jsonl:2: expected a JSON object"),
        (b'{"response": "Hello"}', "in.jsonl:2: missing field 'prompt'"),
        (b'{"prompt": "Hi"}', "in.jsonl:2: missing field 'response'"),
        (b'{"prompt": "Hi", "response": 5}', "in.jsonl:2: field 'response' must be a string"),
        (b'{"messages": [{"role": "user"}], "response": "x"}', "in.jsonl:2: field 'messages'[0]"),
        (b'{"prompt": "Hi", "response": "x", "id": [1]}', "in.jsonl:2: field 'id'"),
        (b'{"prompt": "Hi", "response": "caf\xe9"}', "in.jsonl:2: not valid UTF-8"),
    ],
)
def test_bad_input_names_line_and_field_and_writes_nothing(tmp_path, capsys, bad_line, message):
    code, dst = _run(tmp_path, [GOOD, bad_line, GOOD])
    assert code == 2
    assert message in capsys.readouterr().err
    assert dst.read_text() == "previous results\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_empty_input_is_an_error(tmp_path, capsys):
    code, _ = _run(tmp_path, [b""])
    assert code == 2 and "no records" in capsys.readouterr().err


def test_unknown_verifier_is_named(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_bytes(GOOD + b"\n")
    assert cli_main(["score", str(src), "-o", str(tmp_path / "o.jsonl"), "--verifier", "nope"]) == 2
    assert "unknown verifier 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_unscorable_lines_get_the_floor_and_same_keys(tmp_path):
    code, dst = _run(
        tmp_path,
        [
            b'{"id": "ok", "prompt": "Hi", "response": "Hello", "group": "g"}',
            b'{"id": "empty", "prompt": "Hi", "response": "", "group": "g"}',
            b'{"id": "surrogate", "prompt": "Hi", "response": "bad \\udc80", "group": "g"}',
            b'{"id": "nogroup", "messages": [{"role": "user", "content": "Hi"}], "response": "Hey"}',
        ],
    )
    assert code == 0
    out = [json.loads(line) for line in dst.open()]  # stdlib json: it reads lone-surrogate escapes
    assert [o["error"] for o in out] == [
        None,
        "empty response",
        "undecodable text in response",
        None,
    ]
    # The group is known: the failed lines get the worst scored member's reward minus the margin.
    assert out[1]["cme"] == out[2]["cme"] == pytest.approx(out[0]["cme"] - 0.1)
    assert out[2]["response"] == "bad \udc80"  # written back as the same JSON escape
    assert all("advantage" in o for o in out[:3]) and "advantage" not in out[3]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything tries to load a verifier (the CLI must stop before that)."""
    import cme_rewards.scorer

    def refuse(*args, **kwargs):
        raise AssertionError("a verifier was loaded although the run should have stopped first")

    monkeypatch.setattr(cme_rewards.scorer, "load_verifier", refuse)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device", "bogus"], "--device: not a device: 'bogus'"),
        (["--device", "cuda"], "--device: 'cuda' asked for, but no CUDA device"),
        (["--impl", "triton"], "--impl: triton needs a CUDA device"),
        (["--prompt-template", "{prompt}{0}"], "--prompt-template: is not a valid format string"),
        (["--prompt-template", "{prompt}{"], "--prompt-template: is not a valid format string"),
        (["--prompt-template", "no field"], "--prompt-template: must contain the field {prompt}"),
        (["--verifier", "random:"], "--verifier: random: needs a verifier name after the colon"),
        (["--verifier", "nope"], "--verifier: unknown verifier 'nope'"),
        (["--max-length", "1"], "--max-length: must be at least 2, got 1"),
        (["--max-length", "many"], "--max-length: expected an integer, got 'many'"),
        (["--floor", "nan"], "--floor: must be a finite number"),
        (["--dtype", "float8"], "--dtype: must be one of auto, float32"),
        (["--chat-template", "{% if %}"], "--chat-template: is not a valid Jinja template"),
    ],
)
def test_bad_options_stop_before_the_model_loads(
    tmp_path, capsys, monkeypatch, no_model_load, flags, message
):
    if flags == ["--impl", "triton"]:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    src = tmp_path / "in.jsonl"
    src.write_bytes(GOOD + b"\n")
    code = cli_main(["score", str(src), "-o", str(tmp_path / "o.jsonl"), *flags])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_unwritable_output_is_found_before_loading(tmp_path, capsys, no_model_load):
    src = tmp_path / "in.jsonl"
    src.write_bytes(GOOD + b"\n")
    (tmp_path / "afile").write_text("x")
    for target in (tmp_path / "afile" / "out.jsonl", Path("/proc/out.jsonl"), tmp_path):
        assert cli_main(["score", str(src), "-o", str(target), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"{target}:" in err and "Traceback" not in err


def test_nan_in_an_extra_field_is_an_input_error(tmp_path, capsys, no_model_load):
    line = b'{"prompt": "Hi", "response": "Hello", "weight": NaN}'
    code, dst = _run(tmp_path, [GOOD, line])
    assert code == 2
    assert "in.jsonl:2: NaN is not valid JSON" in capsys.readouterr().err
    assert dst.read_text() == "previous results\n"


@pytest.mark.slow
def test_lone_surrogate_in_a_prompt_gets_the_floor_and_keeps_the_rest(tmp_path):
    code, dst = _run(
        tmp_path,
        [
            b'{"id": "a", "prompt": "Hi \\udc80", "response": "Hello"}',
            b'{"id": "b", "messages": [{"role": "user", "content": "Hi \\udc80"}], "response": "x"}',
            b'{"id": "c", "prompt": "Hi", "response": "Hello"}',
        ],
    )
    assert code == 0
    out = [json.loads(line) for line in dst.open()]
    assert [o["error"] for o in out] == [
        "undecodable text in prompt",
        "undecodable text in prompt message 0",
        None,
    ]
    assert out[0]["cme"] == out[1]["cme"] == -50.0 and out[2]["cme"] > -50.0
