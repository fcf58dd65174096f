"""``cme-rewards agreement``: reading pairs, the figures against a hand computation, the cache,
the controls, the plot and the errors (file:line:field)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import kendalltau, spearmanr

from cme_rewards.agreement import agreement_stats, load_pairs, sample_prompts
from cme_rewards.agreement.cache import TokenCache, text_key
from cme_rewards.agreement.cli import main
from cme_rewards.agreement.stats import pair_scores
from cme_rewards.io import InputError
from cme_rewards.options import ScorerOptions
from cme_rewards.reductions import reduce_token_logprobs
from cme_rewards.winrate.stats import Settings

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "agreement"
PAIRS = DATA / "pairs.jsonl"
ANNOTATIONS = HERE / "data" / "winrate" / "claude-2.1_first40.annotations.json"
SMOL, GEMMA, RANDOM = "smollm2-135m-instruct", "gemma3-270m", "random:smollm2-135m-instruct"
EXACT = ["--dtype", "float32", "--device", "cpu"]  # the committed cache's options


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main([*args, "--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if anything would load a verifier (everything must come from the cache)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a verifier was loaded: the cache was not used")

    monkeypatch.setattr("cme_rewards.scorer.CMEScorer.__init__", refuse)


@pytest.fixture
def fixture_cache(tmp_path) -> Path:
    cache = tmp_path / "cache"
    shutil.copytree(DATA / "cache", cache)
    return cache


# -- reading ----------------------------------------------------------------------------------


def test_judgment_jsonl_pairs_merge_orders_and_count_rows_without_verdict():
    f = load_pairs(PAIRS)
    assert f.n_records == 15 and f.n_no_verdict == 1  # p8's judge error
    by_id = {p.prompt_id: p for p in f.pairs}
    assert sorted(by_id) == ["p1", "p2", "p3", "p4", "p5", "p6", "p7"]
    assert by_id["p1"].preference == pytest.approx((1.9 + 1.7) / 2)  # both orders averaged
    assert by_id["p1"].n_judgments == 2
    assert by_id["p1"].first == "France capital big city maybe Lyon or something."  # baseline
    assert by_id["p1"].second == "The capital of France is Paris."  # model
    assert not by_id["p6"].decided and by_id["p2"].decided


def test_annotations_pairs_keep_texts_and_preference():
    records = json.loads(ANNOTATIONS.read_text())
    f = load_pairs(ANNOTATIONS)
    assert len(f.pairs) == len(records) == 40
    for p, r in zip(f.pairs, records, strict=True):
        assert (p.first, p.second, p.instruction) == (
            r["output_1"],
            r["output_2"],
            r["instruction"],
        )
        assert p.preference == pytest.approx(float(r["preference"]))
        assert (p.model, p.baseline) == (r["generator_2"], r["generator_1"])


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _good(**change) -> dict:
    rec = json.loads(PAIRS.read_text().splitlines()[0])
    rec.update(change)
    return rec


@pytest.mark.parametrize(
    ("records", "line", "field"),
    [
        (
            [
                _good(),
                _good(id="p2"),
                {k: v for k, v in _good(id="p3").items() if k != "output_model"},
            ],
            3,
            "output_model",
        ),
        ([_good(), _good(id="p2", output_baseline=7)], 2, "output_baseline"),
        ([_good(instruction=None, id=None)], 1, "id"),
        ([_good(), _good(preference=3)], 2, "preference"),
        (
            [_good(), _good(order="baseline_first", output_model="another answer")],
            2,
            "output_model",
        ),
    ],
    ids=[
        "missing-answer",
        "answer-not-text",
        "no-prompt",
        "preference-out-of-range",
        "answers-differ",
    ],
)
def test_bad_judgment_lines_are_named_file_line_field(tmp_path, records, line, field):
    path = _jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(InputError) as info:
        load_pairs(path)
    assert str(info.value).startswith(f"{path}:{line}: field '{field}'"), str(info.value)


def test_bad_annotation_record_is_named_file_line_field(tmp_path):
    records = json.loads(ANNOTATIONS.read_text())[:3]
    del records[2]["output_2"]
    path = tmp_path / "bad.annotations.json"
    path.write_text(json.dumps(records, indent=2))
    starts = [i + 1 for i, text in enumerate(path.read_text().splitlines()) if text == "  {"]
    line = starts[2]  # where the third record begins
    with pytest.raises(InputError) as info:
        load_pairs(path)
    assert str(info.value).startswith(f"{path}:{line}: field 'output_2': missing"), str(info.value)


def test_malformed_json_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_good()) + "\n{not json\n")
    with pytest.raises(InputError, match=rf"^{path}:2: malformed JSON"):
        load_pairs(path)


def test_sample_keeps_the_same_prompts_in_every_file_and_nests():
    a = load_pairs(ANNOTATIONS)
    b = load_pairs(ANNOTATIONS)
    b.pairs.reverse()  # another file over the same prompts, in another order
    ids = lambda f: {p.prompt_id for p in f.pairs}  # noqa: E731
    small_a, small_b = sample_prompts([a, b], 5, seed=0)
    big_a, _ = sample_prompts([a, b], 10, seed=0)
    other, _ = sample_prompts([a, b], 10, seed=1)
    assert len(ids(small_a)) == 5 and ids(small_a) == ids(small_b)
    assert ids(small_a) < ids(big_a)
    assert ids(other) != ids(big_a)
    assert sample_prompts([a], None, 0)[0].pairs == a.pairs


# -- statistics -------------------------------------------------------------------------------


def test_pair_scores_count_a_zero_difference_as_one_half():
    diff = np.array([2.0, -1.0, 0.0, 3.0, -0.5])
    pref = np.array([1.9, 1.8, 1.2, 1.1, 1.4])
    assert pair_scores(diff, pref).tolist() == [1.0, 0.0, 0.5, 0.0, 1.0]


def test_agreement_stats_by_hand():
    # four prompts, the last with two pairs: the judge prefers the second answer in pairs 0, 2, 4
    diff = np.array([1.0, 2.0, -1.0, 0.0, 3.0])
    pref = np.array([1.9, 1.2, 1.6, 1.3, 1.7])
    clusters = np.array(["a", "b", "c", "d", "d"])
    ratio = np.array([1.0, 0.4, 1.05, 2.5, 0.95])
    res = agreement_stats(
        diff, pref, clusters, length_ratio=ratio, settings=Settings(n_resamples=200)
    )
    # agree, disagree, disagree, tie (1/2), agree
    assert res.agreement == pytest.approx(100 * 2.5 / 5)
    assert res.agreement_ci.low <= res.agreement <= res.agreement_ci.high
    assert res.spearman == pytest.approx(spearmanr(diff, pref - 1.5).statistic)
    assert res.kendall == pytest.approx(kendalltau(diff, pref - 1.5).statistic)
    # centered: minus the median 1.0 -> [0, 1, -2, -1, 2]: 1/2, 0, 0, 1, 1
    assert res.agreement_centered == pytest.approx(100 * 2.5 / 5)
    # similar length (0.8-1.25x): pairs 0, 2, 4 -> agree, disagree, agree
    assert (res.n_similar_length, res.similar_length) == (3, pytest.approx(100 * 2 / 3))
    bins = {b.label: (b.n, b.agreement) for b in res.length_bins}
    assert bins["<0.5x"] == (1, 0.0) and bins[">2x"] == (1, 50.0)
    assert res.mean_difference == pytest.approx(1.0)
    # prefers the second in pairs 0, 1, 4; pair 3's zero counts one half
    assert res.prefers_second == pytest.approx(100 * 3.5 / 5)


def test_constant_reward_has_no_rank_correlation_and_agrees_with_the_base_rate():
    pref = np.array([1.9, 1.2, 1.6, 1.3, 1.7, 1.1])
    res = agreement_stats(np.ones(6), pref, np.arange(6), settings=Settings(n_resamples=100))
    assert res.agreement == pytest.approx(50.0) and res.spearman is None and res.kendall is None
    with pytest.raises(ValueError, match="ties"):
        agreement_stats(np.ones(2), np.array([1.5, 1.7]), np.arange(2))


def test_pmi_sum_reduction_is_the_summed_difference():
    value, error = reduce_token_logprobs(
        [-1.0, -2.0, -3.0], reduction="pmi_sum", unconditional=[-2.0, -2.0, -4.0]
    )
    assert (value, error) == (pytest.approx(2.0), None)
    assert ScorerOptions(reduction="pmi_sum").reduction == "pmi_sum"


# -- the command on the committed fixture ---------------------------------------------------------


def _cached(verifier: str) -> dict[str, list[float] | None]:
    """The committed token log-probs of ``verifier``: key -> list (None when floored)."""
    cache = TokenCache(
        DATA / "cache", ScorerOptions(verifier=verifier, dtype="float32", device="cpu")
    )
    assert cache.path.exists(), f"no committed cache for {verifier}: {cache.path}"
    return {
        k: None if s.token_logprobs is None else list(s.token_logprobs)
        for k, s in cache.entries.items()
    }


def _by_hand(verifier_lps: dict[str, list[float] | None], prompt: str, answer: str) -> dict:
    lp = verifier_lps[text_key(prompt, answer)]
    if lp is None:
        return {}
    bare = verifier_lps[text_key("", answer)]
    n = len(lp)
    k = math.ceil(0.2 * n)
    return {
        "mean": sum(lp) / n,
        "sum": sum(lp),
        "min_k": sum(sorted(lp)[:k]) / k,
        "pmi": sum(lp) / n - sum(bare) / n,
        "pmi_sum": sum(lp) - sum(bare),
        "per_byte": sum(lp) / len(answer.encode()),
        "n": n,
    }


def test_figures_on_the_committed_fixture_equal_a_hand_computation(
    capsys, fixture_cache, no_model, tmp_path
):
    plot = tmp_path / "agreement.png"
    rc, out, _ = run_cli(
        capsys,
        str(PAIRS),
        "--verifier",
        SMOL,
        "--verifier",
        GEMMA,
        "--verifier",
        RANDOM,
        *EXACT,
        "--cache",
        str(fixture_cache),
        "--n-resamples",
        "100",
        "--json",
        "--plot",
        str(plot),
    )
    assert rc == 0
    doc = json.loads(out)
    assert doc["scoring"]["scored"] == 0
    rows = {(r["verifier"], r["variant"]): r for r in doc["rows"]}
    # p5's empty answer gets the floor: left out; p6 is a tie; p8 has no verdict
    (summary,) = doc["files"]
    assert (
        summary["n_pairs"],
        summary["n_excluded"],
        summary["n_ties"],
        summary["n_no_verdict"],
    ) == (5, 1, 1, 1)

    pairs = [p for p in load_pairs(PAIRS).pairs if p.decided and p.prompt_id != "p5"]
    judge = [1 if p.preference > 1.5 else -1 for p in pairs]
    assert judge == [1, -1, -1, -1, 1]  # p1 and p7: the judge prefers the second answer
    lps = {v: _cached(v) for v in (SMOL, GEMMA, RANDOM)}
    hand = {
        v: [
            (_by_hand(lps[v], p.instruction, p.first), _by_hand(lps[v], p.instruction, p.second))
            for p in pairs
        ]
        for v in lps
    }

    def check(row: dict, diffs: list[float]) -> None:
        agree = [
            1.0 if d * j > 0 else 0.5 if d == 0 else 0.0 for d, j in zip(diffs, judge, strict=True)
        ]
        assert row["n_pairs"] == 5 and row["n_excluded"] == 1
        assert row["agreement"] == pytest.approx(100 * sum(agree) / 5, abs=0.01)
        assert row["ci_low"] <= row["agreement"] <= row["ci_high"]
        second = [1.0 if d > 0 else 0.5 if d == 0 else 0.0 for d in diffs]
        assert row["prefers_second"] == pytest.approx(100 * sum(second) / 5, abs=0.01)
        prefs = [p.preference - 1.5 for p in pairs]
        if len(set(diffs)) > 1:
            assert row["spearman"] == pytest.approx(spearmanr(diffs, prefs).statistic, abs=1e-4)
            assert row["kendall"] == pytest.approx(kendalltau(diffs, prefs).statistic, abs=1e-4)

    for v in lps:
        for variant in ("mean", "sum", "min_k", "pmi", "pmi_sum"):
            check(rows[(v, variant)], [b[variant] - a[variant] for a, b in hand[v]])
    ensemble = [
        (hand[SMOL][i][1]["per_byte"] + hand[GEMMA][i][1]["per_byte"]) / 2
        - (hand[SMOL][i][0]["per_byte"] + hand[GEMMA][i][0]["per_byte"]) / 2
        for i in range(5)
    ]
    check(rows[(f"{SMOL}+{GEMMA}", "ensemble")], ensemble)
    lengths = [b["n"] - a["n"] for a, b in hand[SMOL]]  # the first verifier's tokens
    check(rows[("control", "longer")], lengths)
    check(rows[("control", "shorter")], [-d for d in lengths])
    check(rows[("control", "constant")], [1.0] * 5)
    assert rows[("control", "constant")]["agreement"] == 40.0  # 2 of 5
    assert rows[("control", "constant")]["spearman"] is None
    # read off the fixture by hand: SmolLM2's CME prefers the judge's answer in 4 of 5 pairs
    # (p1, p2, p3, p7 agree; p4's one-word "Gracias." beats the baseline's sentence)
    assert rows[(SMOL, "mean")]["agreement"] == 80.0
    assert set(rows) >= {(RANDOM, v) for v in ("mean", "sum", "min_k", "pmi", "pmi_sum")}
    import matplotlib.image

    image = matplotlib.image.imread(plot)
    assert image.shape[0] > 200 and image.shape[1] > 400


def test_table_names_counts_controls_and_cache_use(capsys, fixture_cache, no_model):
    rc, out, _ = run_cli(
        capsys,
        str(PAIRS),
        "--verifier",
        SMOL,
        *EXACT,
        "--cache",
        str(fixture_cache),
        "--variants",
        "mean",
        "pmi",
        "--n-resamples",
        "100",
    )
    assert rc == 0
    assert (
        "5 pairs, judge prefers the second in 40.0%; left out: 1 floored, 1 ties, 1 without verdict"
        in out
    )
    lines = out.splitlines()
    assert any(line.startswith("control") and " longer " in line for line in lines)
    assert any(line.startswith(SMOL) and " pmi " in line for line in lines)
    assert "texts scored now: 0, taken from the cache: 24" in out


def _scorer_agreement(smollm_scorer, variant: str) -> tuple[float, float]:
    """Agreement (%) and mean difference of ``CMEScorer(reduction=variant)`` on the fixture's pairs."""
    from cme_rewards import CMEScorer

    scorer = CMEScorer(
        SMOL, model=smollm_scorer.model, tokenizer=smollm_scorer.tokenizer, reduction=variant
    )
    pairs = [p for p in load_pairs(PAIRS).pairs if p.decided and p.prompt_id != "p5"]
    own = scorer.score(
        [p.instruction for p in pairs] * 2, [p.first for p in pairs] + [p.second for p in pairs]
    )
    diffs = [b.cme - a.cme for a, b in zip(own[:5], own[5:], strict=True)]
    judge = [1 if p.preference > 1.5 else -1 for p in pairs]
    agree = [
        1.0 if d * j > 0 else 0.5 if d == 0 else 0.0 for d, j in zip(diffs, judge, strict=True)
    ]
    return 100 * sum(agree) / 5, float(np.mean(diffs))


def _measured(variants: list[str]) -> dict[str, object]:
    from cme_rewards.agreement.measure import measure

    options = ScorerOptions(verifier=SMOL, dtype="float32", device="cpu")
    report = measure(
        [load_pairs(PAIRS)],
        [SMOL],
        options,
        variants=variants,
        cache_dir=DATA / "cache",
        settings=Settings(bootstrap=False),
        progress=False,
    )
    assert report.scoring.scored == 0
    return {r.variant: r.result for r in report.rows if r.verifier == SMOL}


@pytest.mark.slow
def test_each_variant_is_the_scorers_own_reduction(smollm_scorer):
    measured = _measured(["mean", "sum", "min_k", "pmi"])
    for variant, result in measured.items():
        agreement, mean_difference = _scorer_agreement(smollm_scorer, variant)
        assert result.agreement == pytest.approx(agreement), variant
        assert result.mean_difference == pytest.approx(mean_difference, abs=1e-4), variant


@pytest.mark.slow
def test_pmi_sum_is_the_scorers_own_reduction(smollm_scorer):
    result = _measured(["pmi_sum"])["pmi_sum"]
    agreement, mean_difference = _scorer_agreement(smollm_scorer, "pmi_sum")
    assert result.agreement == pytest.approx(agreement)
    assert result.mean_difference == pytest.approx(mean_difference, abs=1e-4)


# -- the cache ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_rerun_scores_nothing_twice(capsys, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    args = [
        str(PAIRS),
        "--verifier",
        SMOL,
        *EXACT,
        "--cache",
        str(cache),
        "--variants",
        "mean",
        "pmi",
        "--n-resamples",
        "50",
        "--json",
    ]
    rc, out, _ = run_cli(capsys, *args)
    first = json.loads(out)
    assert rc == 0 and first["scoring"] == {"scored": 24, "from_cache": 0}  # 12 answers x 2 passes
    monkeypatch.setattr("cme_rewards.scorer.CMEScorer.__init__", lambda *a, **k: 1 / 0)
    rc, out, _ = run_cli(capsys, *args)
    second = json.loads(out)
    assert rc == 0 and second["scoring"] == {"scored": 0, "from_cache": 24}
    assert second["rows"] == first["rows"]
    # the fresh pass reproduces the committed one (float32 path)
    committed, fresh = (
        _cached(SMOL),
        TokenCache(cache, ScorerOptions(verifier=SMOL, dtype="float32", device="cpu")),
    )
    assert fresh.entries.keys() <= committed.keys()
    for key, scored in fresh.entries.items():
        if scored.token_logprobs is None:
            assert committed[key] is None
        else:
            np.testing.assert_allclose(scored.token_logprobs, committed[key], atol=1e-3)


def test_an_interrupted_cache_file_keeps_its_whole_lines(tmp_path):
    options = ScorerOptions(verifier=SMOL, dtype="float32", device="cpu")
    src = TokenCache(DATA / "cache", options)
    target = TokenCache(tmp_path, options)
    lines = src.path.read_text().splitlines(keepends=True)
    target.path.write_text("".join(lines[:3]) + lines[3][:40])  # killed mid-line
    assert len(TokenCache(tmp_path, options).entries) == 3
    other = TokenCache(tmp_path, options.replace(max_length=512))  # other options, other file
    assert other.path != target.path and not other.entries


# -- errors before anything loads -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-length", "1"], "--max-length: must be at least 2"),
        (["--verifier", "no-such-model"], "--verifier:"),
        (["--variants", "ensemble"], "ensemble needs at least two verifiers"),
        (["--sample", "0"], "--sample must be at least 1"),
        (["--dtype", "int8"], "--dtype: must be one of"),
    ],
)
def test_bad_options_fail_before_loading(capsys, no_model, extra, message):
    rc, _, err = run_cli(capsys, str(PAIRS), *extra)
    assert rc == 2 and message in err, err


def test_missing_and_bad_files_fail_with_their_names(capsys, no_model, tmp_path):
    rc, _, err = run_cli(capsys, str(tmp_path / "nope.jsonl"))
    assert rc == 2 and f"{tmp_path / 'nope.jsonl'}: no such file" in err
    bad = _jsonl(
        tmp_path / "bad.jsonl",
        [_good(), {k: v for k, v in _good().items() if k != "output_baseline"}],
    )
    rc, _, err = run_cli(capsys, str(bad))
    assert rc == 2 and f"{bad}:2: field 'output_baseline': missing" in err


# -- the README's command ---------------------------------------------------------------------


@pytest.mark.slow
def test_the_readme_command_runs_as_written(tmp_path):
    """The README's ``cme-rewards agreement`` line, run as a process from a checkout-like folder:
    real verifier and its random-weight control, default options, a table and a plot."""
    from test_readme import command, linked_checkout, run_in

    cmd = command("cme-rewards agreement")
    proc = run_in(linked_checkout(tmp_path), cmd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "5 pairs, judge prefers the second in 40.0%" in proc.stdout
    lines = proc.stdout.splitlines()
    for name in (SMOL, RANDOM, "control"):
        assert any(line.startswith(name + " ") for line in lines), (name, proc.stdout)
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "agreement.png").shape[1] > 400


def test_committed_alpacaeval_results_cover_what_the_docs_report():
    """benchmarks/results/agreement.json (docs/agreement.md's numbers): three files of at least
    198 decided pairs, both verifiers and both random controls with every variant, the ensemble
    and the controls; the constant control equals the judge's share for the second answer."""
    doc = json.loads((HERE.parent / "benchmarks" / "results" / "agreement.json").read_text())
    assert len(doc["files"]) == 3 and all(f["n_pairs"] >= 198 for f in doc["files"])
    assert (
        doc["settings"]["sample"] >= 200 and doc["scoring"]["scored"] + doc["scoring"]["from_cache"]
    )
    rows = {(r["file"], r["verifier"], r["variant"]): r for r in doc["rows"]}
    verifiers = [SMOL, GEMMA, RANDOM, "random:gemma3-270m"]
    for f in doc["files"]:
        for v in verifiers:
            for variant in ("mean", "sum", "min_k", "pmi", "pmi_sum"):
                row = rows[(f["file"], v, variant)]
                assert (
                    row["n_pairs"] == f["n_pairs"]
                    and row["ci_low"] <= row["agreement"] <= row["ci_high"]
                )
        assert (f["file"], f"{SMOL}+{GEMMA}", "ensemble") in rows
        constant = rows[(f["file"], "control", "constant")]
        assert constant["agreement"] == f["judge_prefers_second"]
        longer, shorter = (
            rows[(f["file"], "control", c)]["agreement"] for c in ("longer", "shorter")
        )
        assert longer + shorter == pytest.approx(100.0, abs=0.01)
