"""Win rates: AlpacaEval parity, input handling, cluster bootstrap, sign test, position bias, LC."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jsonlines
import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.stats import binomtest

from cme_rewards.io import InputError
from cme_rewards.winrate import Settings, compare, load_judgments
from cme_rewards.winrate.cli import main
from cme_rewards.winrate.lc import fit_logistic, length_feature

DATA = Path(__file__).parent / "data" / "winrate"
FIXTURE40 = DATA / "claude-2.1_first40.annotations.json"
LEGACY = DATA / "legacy_preferences.annotations.json"
SHARED = Path(__file__).parents[2] / "shared" / "data" / "alpaca_eval"
LEADERBOARD_FIELDS = ("win_rate", "standard_error", "n_wins", "n_wins_base", "n_draws", "n_total",
                      "discrete_win_rate")  # fmt: skip
FAST = Settings(n_resamples=2000)


def shared_dir() -> Path:
    """The shared AlpacaEval files; a test needing them fails in CI when they are missing."""
    if not SHARED.is_dir():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the shared data folder {SHARED} is missing")
        pytest.skip(f"{SHARED} not present (a fresh clone has no ../shared)")
    return SHARED


def write_jsonl(path: Path, records: list[dict]) -> Path:
    with jsonlines.open(path, "w") as w:
        w.write_all(records)
    return path


def judgment_records(
    n_prompts: int = 30, judges=("j1", "j2"), seed: int = 0, lengths=True
) -> list[dict]:
    """Synthetic judgments: both orders, several judges, the model better on ~60% of prompts."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n_prompts):
        good = rng.random() < 0.6
        for judge in judges:
            for order in ("model_first", "baseline_first"):
                u = rng.random()
                winner = ("model" if good else "baseline") if u < 0.7 else ("tie" if u < 0.8 else
                          ("baseline" if good else "model"))  # fmt: skip
                rec = {"id": f"p{i}", "instruction": f"question {i}", "model": "m", "baseline": "b",
                       "judge": judge, "order": order, "winner": winner, "error": None}  # fmt: skip
                if lengths:
                    rec["output_model"] = "x" * int(50 + 40 * good + rng.integers(0, 30))
                    rec["output_baseline"] = "y" * int(60 + rng.integers(0, 30))
                records.append(rec)
    return records


def alpaca_reference(records: list[dict]) -> dict[str, float]:
    """AlpacaEval's formulas (its README / metrics), float64, written out independently."""
    p = np.array([float(r["preference"]) for r in records])
    p = p[~np.isnan(p)]
    p[p == 0] = 1.5
    q = p - 1
    n_draws = int(np.sum(p == 1.5))
    return {
        "win_rate": 100 * q.mean(),
        "standard_error": 100 * q.std(ddof=1) / math.sqrt(len(q)),
        "n_wins": int(np.sum(q > 0.5)),
        "n_wins_base": int(np.sum(q < 0.5)),
        "n_draws": n_draws,
        "n_total": len(q),
        "discrete_win_rate": 100 * (np.sum(q > 0.5) + 0.5 * n_draws) / len(q),
    }


def test_fixture_matches_alpaca_formulas():
    (res,) = compare(load_judgments([FIXTURE40]), FAST)
    ref = alpaca_reference(json.loads(FIXTURE40.read_text()))
    for name, value in ref.items():
        assert getattr(res, name) == pytest.approx(value, abs=1e-9), name
    assert res.n_prompts == 40 and res.judge == "weighted_alpaca_eval_gpt4_turbo"
    assert res.mean_preference.normal_interval.low == pytest.approx(
        res.win_rate - 1.959963984540054 * res.standard_error
    )


def test_shared_files_match_published_leaderboard():
    folder = shared_dir()
    rows = {r[""]: r for r in csv.DictReader((folder / "leaderboard_subset.csv").open())}
    files = sorted(folder.glob("*.annotations.json"))
    assert len(files) == 3
    results = {r.model: r for r in compare(load_judgments(files), Settings(bootstrap=False))}
    assert set(results) == set(rows)
    for model, row in rows.items():
        for name in LEADERBOARD_FIELDS:
            assert getattr(results[model], name) == pytest.approx(float(row[name]), abs=1e-6), (
                model,
                name,
            )


def test_shared_files_cli_json_reports_bootstrap_next_to_normal(capsys):
    folder = shared_dir()
    files = [str(p) for p in sorted(folder.glob("*.annotations.json"))]
    assert main([*files, "--json", "--n-resamples", "2000", "--seed", "3"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {r[""]: r for r in csv.DictReader((folder / "leaderboard_subset.csv").open())}
    for res in doc["results"]:
        for name in LEADERBOARD_FIELDS:
            assert res[name] == pytest.approx(float(rows[res["model"]][name]), abs=1e-6)
        mp = res["mean_preference"]
        normal, bca = mp["normal_interval"], mp["confidence_interval"]
        # one judgment per prompt: the cluster bootstrap and the normal interval nearly agree
        assert abs((bca[1] - bca[0]) - (normal[1] - normal[0])) < 0.15 * (normal[1] - normal[0])
        assert bca[0] < res["win_rate"] < bca[1]


def test_legacy_strings_zero_and_nan_are_read_and_counted(capsys):
    judgments = load_judgments([LEGACY])
    assert sum(judgments.dropped.values()) == 3
    (res,) = compare(judgments, FAST)
    assert (res.n_total, res.n_wins, res.n_wins_base, res.n_draws) == (7, 2, 2, 3)
    assert res.win_rate == pytest.approx(100 * (0.75 + 0.5 + 0.5 + 0.2 + 1 + 0 + 0.5) / 7)
    assert res.discrete_win_rate == pytest.approx(100 * 3.5 / 7)
    assert res.dropped == {"nan_preference": 3}
    assert main([str(LEGACY), "--n-resamples", "500"]) == 0
    out = capsys.readouterr().out
    assert "nan_preference=3" in out and "Dropped 3 rows" in out


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("{not json", "malformed JSON"),
        ('{"id": "p", "model": "m", "baseline": "b", "winner": "draw"}', "field 'winner': unknown label 'draw'"),
        ('{"id": "p", "model": "m", "baseline": "b", "preference": 2.5}', "field 'preference'"),
        ('{"id": "p", "model": "m", "baseline": "b", "preference": "abc"}', "field 'preference': not a number"),
        ('{"id": "p", "baseline": "b", "winner": "model"}', "field 'model': missing"),
        ('{"id": "p", "model": "m", "baseline": "b"}', "field 'winner'"),
        ('{"id": "p", "model": "m", "baseline": "b", "winner": "tie", "order": "first"}', "field 'order'"),
    ],
)  # fmt: skip
def test_bad_line_names_file_line_and_field(tmp_path, capsys, line, expected):
    good = json.dumps({"id": "q", "model": "m", "baseline": "b", "winner": "model"})
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{good}\n{line}\n")
    with pytest.raises(InputError, match=r"bad\.jsonl.*4") as exc:
        load_judgments([path])
    assert expected in str(exc.value)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "4" in err and expected in err


def test_bad_annotation_record_names_line_and_field(tmp_path):
    recs = json.loads(LEGACY.read_text())[:3]
    recs[2]["preference"] = 3.0
    path = tmp_path / "bad.annotations.json"
    path.write_text(json.dumps(recs, indent=1))
    opens = [i + 1 for i, t in enumerate(path.read_text().splitlines()) if t == " {"]
    line = opens[2]  # the line where the third record starts
    with pytest.raises(InputError, match=r"field 'preference'") as exc:
        load_judgments([path])
    assert "record 3" in str(exc.value) and f"line {line}" in str(exc.value)


def test_empty_and_all_dropped_inputs_fail_clearly(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main([str(empty)]) == 2
    assert "no usable judgments" in capsys.readouterr().err
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(InputError, match="no usable judgments"):
        load_judgments([tmp_path / "empty.json"])
    errors = write_jsonl(tmp_path / "errors.jsonl", [
        {"id": "p", "model": "m", "baseline": "b", "judge": "j", "error": "unparseable verdict"}])  # fmt: skip
    with pytest.raises(InputError, match=r"1 rows dropped.*judge_error"):
        load_judgments([errors])
    with pytest.raises(InputError, match="no such file"):
        load_judgments([tmp_path / "missing.jsonl"])


def test_error_lines_are_excluded_and_counted(tmp_path):
    recs = judgment_records(10)
    recs[0]["error"], recs[0]["winner"] = "unparseable verdict after 3 attempts", None
    recs[5]["error"] = "request rejected"
    results = compare(load_judgments([write_jsonl(tmp_path / "j.jsonl", recs)]), FAST)
    by_judge = {r.judge: r for r in results}
    assert by_judge["j1"].dropped == {"judge_error": 2}
    assert by_judge["pooled"].dropped == {"judge_error": 2}
    assert by_judge["j1"].n_total == 18 and by_judge["pooled"].n_total == 38


def test_cluster_bootstrap_moves_prompts_together(tmp_path):
    """Judging every prompt twice with identical verdicts adds no information: AlpacaEval's SE
    (judgments as independent) shrinks, the prompt-cluster interval must not move at all."""
    recs = []
    for i, r in enumerate(json.loads(FIXTURE40.read_text())):
        for order in ("model_first", "baseline_first"):
            recs.append({"id": str(i), "model": r["generator_2"], "baseline": r["generator_1"],
                         "judge": r["annotator"], "order": order, "preference": r["preference"]})  # fmt: skip
    (once,) = compare(load_judgments([FIXTURE40]), FAST)
    (twice,) = compare(load_judgments([write_jsonl(tmp_path / "x.jsonl", recs)]), FAST)
    assert twice.win_rate == pytest.approx(once.win_rate, abs=1e-12)
    assert twice.standard_error < once.standard_error / 1.35
    for name in ("mean_preference", "tie_adjusted"):
        a, b = getattr(once, name), getattr(twice, name)
        assert np.allclose(a.confidence_interval, b.confidence_interval, atol=1e-9, rtol=0)
        assert np.allclose(a.percentile_interval, b.percentile_interval, atol=1e-9, rtol=0)


def test_bootstrap_standard_error_matches_analytic_for_one_judgment_per_prompt():
    (res,) = compare(load_judgments([FIXTURE40]), Settings(n_resamples=10_000, seed=1))
    q = np.array([r["preference"] for r in json.loads(FIXTURE40.read_text())]) - 1
    analytic = 100 * q.std(ddof=0) / math.sqrt(len(q))  # plug-in SE the bootstrap estimates
    assert res.mean_preference.standard_error == pytest.approx(analytic, rel=0.05)
    assert res.mean_preference.method.startswith("BCa")
    lo, hi = res.mean_preference.confidence_interval
    plo, phi = res.mean_preference.percentile_interval
    assert lo < res.win_rate < hi and plo < res.win_rate < phi
    assert (lo, hi) != (plo, phi)


def test_seed_reproducible_to_the_digit_and_other_seeds_differ(tmp_path, capsys):
    path = write_jsonl(tmp_path / "j.jsonl", judgment_records(25))
    outs = []
    for seed in (7, 7, 8):
        assert main([str(path), "--json", "--seed", str(seed), "--n-resamples", "1000"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


def test_per_judge_and_pooled_rows(tmp_path):
    recs = judgment_records(30)
    results = compare(load_judgments([write_jsonl(tmp_path / "j.jsonl", recs)]), FAST)
    assert [r.judge for r in results] == ["j1", "j2", "pooled"]
    pooled = results[2]
    assert pooled.n_total == 120 and pooled.n_prompts == 30 and pooled.judges == ["j1", "j2"]
    d = np.array([{"model": 1, "baseline": 0, "tie": 0.5}[r["winner"]] for r in recs])
    assert pooled.discrete_win_rate == pytest.approx(100 * d.mean())
    assert pooled.win_rate == pytest.approx(100 * d.mean())  # winner labels only: q == d
    # pooling two judges of the same prompts narrows the interval less than sqrt(2)
    w = [
        r.tie_adjusted.confidence_interval.high - r.tie_adjusted.confidence_interval.low
        for r in results
    ]
    assert w[2] > min(w[:2]) / math.sqrt(2)


def test_sign_test_over_prompts_excludes_net_ties(tmp_path):
    recs = judgment_records(30, judges=("j1",))
    (res,) = compare(load_judgments([write_jsonl(tmp_path / "j.jsonl", recs)]), FAST)
    score = {"model": 1.0, "baseline": 0.0, "tie": 0.5}
    per_prompt: dict[str, list[float]] = {}
    for r in recs:
        per_prompt.setdefault(r["id"], []).append(score[r["winner"]])
    means = [np.mean(v) for v in per_prompt.values()]
    k, n_lost = sum(m > 0.5 for m in means), sum(m < 0.5 for m in means)
    assert k + n_lost < 30  # some prompts net to a tie and are excluded
    expected = binomtest(k, k + n_lost, 0.5)
    st = res.sign_test
    assert (st.n_model, st.n_baseline, st.n_tied) == (k, n_lost, 30 - k - n_lost)
    assert st.pvalue == pytest.approx(expected.pvalue, rel=1e-12)
    assert st.statistic == pytest.approx(100 * k / (k + n_lost))
    assert st.confidence_interval.low < st.statistic < st.confidence_interval.high


def test_position_consistency_and_first_position_rate(tmp_path):
    recs = []
    for i in range(10):
        for order in ("model_first", "baseline_first"):
            # "first" always wins for prompts 0-5; prompts 6-9: the model wins in both orders
            winner = ("model" if order == "model_first" else "baseline") if i < 6 else "model"
            recs.append({"id": str(i), "model": "m", "baseline": "b", "judge": "j", "order": order,
                         "winner": winner})  # fmt: skip
    recs.append({"id": "10", "model": "m", "baseline": "b", "judge": "j", "order": "model_first",
                 "winner": "model"})  # one order only: not a pair  # fmt: skip
    (res,) = compare(load_judgments([write_jsonl(tmp_path / "j.jsonl", recs)]), FAST)
    assert res.position.n_pairs == 10
    assert res.position.consistency == pytest.approx(40.0)
    assert res.position.first_position_win_rate == pytest.approx(100 * (12 + 4) / 20)
    assert res.sign_test.n_tied == 6  # first-wins prompts net to a tie


def test_lc_fit_matches_float64_optimizer():
    rng = np.random.default_rng(0)
    n = 200
    delta = rng.normal(0, 300, n)
    x = length_feature(delta)
    c = rng.integers(1, 5, n).astype(float)
    q = 1 / (1 + np.exp(-(-0.4 + 1.3 * x)))
    s = c * np.clip(q + rng.normal(0, 0.2, n), 0, 1)
    theta, phi = fit_logistic(s, c, x)

    def nll(b):
        z = b[0] + b[1] * x
        return -np.sum(s * -np.logaddexp(0, -z) + (c - s) * -np.logaddexp(0, z))

    ref = minimize(nll, [0.0, 0.0], method="BFGS", options={"gtol": 1e-10}).x
    assert theta == pytest.approx(ref[0], abs=1e-4) and phi == pytest.approx(ref[1], abs=1e-4)
    assert np.std(delta, ddof=1) > 0 and np.allclose(x, np.tanh(delta / np.std(delta, ddof=1)))
    # batched fit: each row of a batch equals its own fit
    batch = fit_logistic(np.stack([s, s[::-1]]), np.stack([c, c[::-1]]), np.stack([x, x]))
    single = fit_logistic(s[::-1], c[::-1], x)
    assert batch[0][1] == pytest.approx(single[0], abs=1e-9)


def test_lc_equals_win_rate_without_length_differences(tmp_path):
    recs = judgment_records(20, judges=("j",))
    for r in recs:
        r["output_model"] = r["output_baseline"] = "same length"
    (res,) = compare(load_judgments([write_jsonl(tmp_path / "j.jsonl", recs)]), FAST)
    assert res.length_controlled.statistic == pytest.approx(res.win_rate, abs=1e-3)
    assert res.length_coefficient == pytest.approx(0.0, abs=1e-9)


def test_lc_sandwich_interval_agrees_with_bootstrap_of_refits():
    judgments = load_judgments([FIXTURE40])
    (analytic,) = compare(judgments, FAST)
    (boot,) = compare(judgments, Settings(n_resamples=500, lc_resamples=4000))
    a, b = analytic.length_controlled, boot.length_controlled
    assert a.statistic == b.statistic
    assert "Wald" in a.method and "refits" in b.method
    wa = a.confidence_interval.high - a.confidence_interval.low
    wb = b.percentile_interval.high - b.percentile_interval.low
    assert 0.7 < wa / wb < 1.4
    assert a.confidence_interval.low < a.statistic < a.confidence_interval.high


def test_lc_missing_without_outputs(tmp_path):
    recs = judgment_records(10, lengths=False)
    results = compare(load_judgments([write_jsonl(tmp_path / "j.jsonl", recs)]), FAST)
    assert all(r.length_controlled is None for r in results)
    assert any("output_model" in n for n in results[0].notes)


def test_several_models_one_table_and_forest_plot(tmp_path, capsys):
    plot = tmp_path / "forest.png"
    assert main([str(FIXTURE40), str(LEGACY), "--plot", str(plot), "--n-resamples", "500"]) == 0
    out = capsys.readouterr().out
    assert out.count("Against baseline 'gpt4_1106_preview'") == 1
    assert "claude-2.1" in out and "legacy-model" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000


@pytest.mark.slow
def test_python_m_entry_point(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cme_rewards.winrate", str(FIXTURE40), "--json", "--n-resamples", "200"],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["results"][0]["n_total"] == 40
