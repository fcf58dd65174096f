"""Property tests of the command-line tools' input files (hypothesis).

``cme-rewards score``: for any JSONL file (valid records with any Unicode in every field, extra
fields holding any JSON value, mixed with broken lines), the run either scores every line, each
exactly as it would be scored alone, with a finite reward and every input field kept, or stops
with exit status 2 and a message naming the first broken line, leaving no output file. Never a
traceback.

``python -m cme_rewards.winrate``: for any judgment file (JSONL or an AlpacaEval JSON array, any
values in any field), exit 0 with finite figures or exit 2 naming the file; never a traceback.

The scorer runs a tiny random-weight Llama saved with SmolLM2's tokenizer (``--verifier FOLDER``),
so each example loads in a moment; ``tests/test_score_cli.py`` runs the real verifiers.
"""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
from conftest import tiny_llama
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_properties_server import MANY, MEGA, PROPS, hostile_text, json_values, messages

from cme_rewards.cli import main as cli_main
from cme_rewards.results import finish_groups
from cme_rewards.winrate.cli import main as winrate_main

RESULT_KEYS = {"cme", "n_tokens", "truncated", "error", "advantage"}
RESERVED = {"prompt", "messages", "response", "id", "group", *RESULT_KEYS}
MAX_LENGTH = 64


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from transformers import AutoTokenizer

    from cme_rewards.models import cached_model_dir

    folder = tmp_path_factory.mktemp("tiny-verifier")
    tiny_llama().save_pretrained(folder)
    AutoTokenizer.from_pretrained(cached_model_dir("smollm2-135m-instruct")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def oracle(tiny_folder):
    """The same verifier as the CLI loads, for scoring each line alone."""
    from cme_rewards import CMEScorer

    return CMEScorer(str(tiny_folder), device="cpu", dtype="float32", max_length=MAX_LENGTH)


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = argv[0](argv[1:])
    return code, out.getvalue(), err.getvalue()


# -- cme-rewards score ----------------------------------------------------------------------------

extras = st.dictionaries(hostile_text.filter(lambda k: k not in RESERVED), json_values, max_size=3)
labels = (st.integers(min_value=-(10**20), max_value=10**20) | hostile_text).map(
    lambda v: ("group", v)
)
records = st.builds(
    lambda prompt, response, id_, group, extra: {
        **extra,
        **dict([prompt]),
        "response": response,
        **({} if id_ is None else {"id": id_}),
        **dict([group] if group else []),
    },
    prompt=st.tuples(st.just("prompt"), hostile_text | messages)
    | st.tuples(st.just("messages"), messages),
    response=hostile_text,
    id_=st.none() | hostile_text | st.integers(min_value=-(10**6), max_value=10**6),
    group=st.none() | labels,
    extra=extras,
)
good_lines = records.map(lambda r: json.dumps(r).encode())
bad_lines = st.sampled_from(
    [
        b"{",
        b"[1, 2]",
        b'"just a string"',
        b'{"prompt": "x"}',
        b'{"response": "x"}',
        b'{"prompt": "x", "response": 5}',
        b'{"prompt": [], "response": "x"}',
        b'{"messages": "x", "response": "x"}',
        b'{"prompt": [{"role": "user"}], "response": "x"}',
        b'{"prompt": "x", "response": "y", "id": [1]}',
        b'{"prompt": "x", "response": "y", "group": true}',
        b'{"prompt": "x", "response": "y", "w": NaN}',
        b'{"prompt": "x", "response": "y", "w": Infinity}',
        b'{"prompt": "x", "response": "caf\xe9"}',
        b"\xff\xfe",
        b"[" * 50_000,
        b'{"prompt": "x", "response": "y", "n": ' + b"1" * 5000 + b"}",
    ]
) | json_values.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode())


def score_file(folder, tiny_folder, lines: list[bytes]) -> tuple[int, str]:
    src, dst = folder / "in.jsonl", folder / "out.jsonl"
    src.write_bytes(b"".join(line + b"\n" for line in lines))
    argv = [cli_main, "score", str(src), "-o", str(dst), "--verifier", str(tiny_folder)]
    argv += ["--max-length", str(MAX_LENGTH), "--device", "cpu", "--dtype", "float32"]
    code, _, err = run([*argv, "--no-progress"])
    assert "Traceback" not in err
    return code, err


@settings(PROPS, max_examples=10)  # each example loads the verifier: about a second
@given(lines=st.lists(good_lines, min_size=1, max_size=8))
@example(lines=[json.dumps({"prompt": "\u202e" * (MEGA // 3), "response": "\ud800",
                            "id": "\n" * 100, "x": "\x00" * MEGA}).encode(),
                json.dumps({"messages": [{"role": "\u2028", "content": "a" * MEGA}],
                            "response": "b" * 1000, "group": "g"}).encode(),
                json.dumps({"prompt": "c", "response": "d", "group": "g"}).encode()])  # fmt: skip
def test_score_scores_every_line_as_if_alone(tmp_path_factory, tiny_folder, oracle, lines):
    folder = tmp_path_factory.mktemp("run")
    code, err = score_file(folder, tiny_folder, lines)
    assert code == 0, err[-2000:]
    rows = [json.loads(line) for line in lines]
    out = [json.loads(line) for line in (folder / "out.jsonl").open()]  # reads surrogate escapes
    assert len(out) == len(rows)
    want = oracle.score(
        [r.get("prompt", r.get("messages")) for r in rows], [r["response"] for r in rows]
    )
    grouped = [i for i, r in enumerate(rows) if "group" in r]
    if grouped:
        finish_groups([want[i] for i in grouped], [rows[i]["group"] for i in grouped],
                      oracle.options)  # fmt: skip
    for row, got, w in zip(rows, out, want, strict=True):
        assert {k: got[k] for k in row} == row  # every input field kept, as it was
        assert set(got) - set(row) == RESULT_KEYS - ({"advantage"} if "group" not in row else set())
        assert isinstance(got["cme"], float) and math.isfinite(got["cme"])
        assert got["error"] == w.error and got["n_tokens"] == w.n_tokens
        assert got["cme"] == pytest.approx(w.cme, abs=1e-4)
        if "group" in row:
            assert got["advantage"] == pytest.approx(w.advantage, abs=1e-3)


@MANY
@given(
    before=st.lists(good_lines, max_size=4),
    bad=bad_lines,
    after=st.lists(good_lines | bad_lines, max_size=4),
)
def test_score_names_the_first_bad_line_and_writes_nothing(tmp_path_factory, tiny_folder, before,
                                                           bad, after):  # fmt: skip
    folder = tmp_path_factory.mktemp("run")
    code, err = score_file(folder, tiny_folder, [*before, bad, *after])
    assert code == 2 and f"in.jsonl:{len(before) + 1}:" in err, err[-2000:]
    assert [p.name for p in folder.iterdir()] == ["in.jsonl"]


# -- python -m cme_rewards.winrate ----------------------------------------------------------------

names = st.sampled_from(["m", "b", "judge-1"]) | hostile_text
judgment = st.fixed_dictionaries(
    {"id": st.sampled_from(["p1", "p2", "p3"]) | hostile_text, "model": names, "baseline": names},
    optional={
        "judge": names,
        "instruction": hostile_text,
        "order": st.sampled_from(["model_first", "baseline_first"]) | json_values,
        "winner": st.sampled_from(["model", "baseline", "tie"]) | json_values,
        "preference": st.floats(1, 2) | st.sampled_from([0, "1.5", "nan", None]) | json_values,
        "error": st.sampled_from([None, False, "", "no verdict"]) | json_values,
        "output_model": hostile_text,
        "output_baseline": hostile_text,
    },
)
annotation = st.fixed_dictionaries(
    {"instruction": hostile_text, "generator_1": names, "generator_2": names},
    optional={
        "preference": st.floats(1, 2) | st.sampled_from([0, "2", float("nan")]) | json_values,
        "annotator": names,
        "output_1": hostile_text,
        "output_2": hostile_text,
    },
)


BOOTSTRAP = st.sampled_from([["--no-bootstrap"], ["--n-resamples", "50", "--lc-resamples", "5"]])


@MANY
@given(
    rows=st.lists(judgment | json_values, min_size=1, max_size=8),
    as_array=st.booleans(),
    tail=st.sampled_from(["", "\n", " garbage", "]"]),
    flags=BOOTSTRAP,
)
@example(rows=[{"id": "p", "model": "m\ud800", "baseline": "b", "winner": "model"}],
         as_array=False, tail="", flags=["--no-bootstrap"])  # fmt: skip
@example(rows=[{"id": "p", "model": "m", "baseline": "b", "preference": 10**400}],
         as_array=False, tail="", flags=["--no-bootstrap"])  # fmt: skip
def test_winrate_never_crashes_on_judgment_files(tmp_path_factory, rows, as_array, tail, flags):
    path = tmp_path_factory.mktemp("judgments") / ("j.json" if as_array else "j.jsonl")
    text = json.dumps(rows, indent=1) if as_array else "\n".join(json.dumps(r) for r in rows)
    path.write_text(text + tail)
    code, out, err = run([winrate_main, str(path), "--json", *flags])
    assert code in (0, 2) and "Traceback" not in err
    if code == 2:
        assert err.startswith("error: ") and "j.json" in err, err
    else:
        json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} in the output"))


@MANY
@given(rows=st.lists(annotation | json_values, min_size=1, max_size=6), flags=BOOTSTRAP)
def test_winrate_reads_any_annotation_array(tmp_path_factory, rows, flags):
    path = tmp_path_factory.mktemp("annotations") / "x.annotations.json"
    path.write_text(json.dumps(rows, indent=2))
    code, out, err = run([winrate_main, str(path), "--json", *flags])
    assert code in (0, 2) and "Traceback" not in err
    if code == 0:
        doc = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} in the output"))
        assert sum(r["n_total"] for r in doc["results"]) >= 1
    else:
        assert "x.annotations.json" in err, err
