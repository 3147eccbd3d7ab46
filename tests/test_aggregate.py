"""rliable aggregates: hand-checked IQM, CI coverage, P(improvement), edge cases, figures."""
import json

import matplotlib
import numpy as np
import pandas as pd
import pytest
from rliable import metrics

from analysis import aggregate as agg
from analysis import plotting


def _write_runs(root, scores: dict):
    """scores: {(method, task): [score per seed]} -> eval.json files (as the evaluate step
    writes them) under root."""
    for (method, task), vals in scores.items():
        for seed, s in enumerate(vals):
            d = root / method / task / f"seed{seed}"
            d.mkdir(parents=True)
            (d / agg.SCORE_FILE).write_text(json.dumps({
                "method": method, "task": task, "seed": seed, "normalized_score": s,
                "return_mean": 0.0, "return_std": 0.0, "eval_episodes": 10, "steps": 1,
                "wall_time_s": 1.0, "git_sha": "x", "config_hash": "y"}))


def _df(rows):
    return pd.DataFrame(rows, columns=["method", "task", "seed", "normalized_score"])


def test_iqm_matches_hand_value():
    # 8 values: the IQM drops the lowest 2 and highest 2 -> mean(3, 4, 5, 6) = 4.5
    scores = np.array([[1.0, 100.0, 3.0, 4.0], [5.0, 6.0, -50.0, 8.0]])
    assert metrics.aggregate_iqm(scores) == pytest.approx(4.5)
    df = _df([("a", f"t{j}", i, scores[i, j]) for i in range(2) for j in range(4)])
    out = agg.aggregate(df, reps=200, seed=0).set_index("metric")
    assert out.loc["IQM", "estimate"] == pytest.approx(4.5)
    assert out.loc["Mean", "estimate"] == pytest.approx(scores.mean())
    assert out.loc["Median", "estimate"] == pytest.approx(np.median(scores.mean(0)))
    # optimality gap on the 0-100 scale: 100 - mean(min(score, 100))
    assert out.loc["Optimality Gap", "estimate"] == pytest.approx(100 - np.minimum(scores, 100).mean())


def test_bootstrap_ci_contains_true_value_and_is_reproducible():
    rng = np.random.default_rng(1)
    true_mean = 60.0
    rows = [("m", f"t{j}", i, true_mean + rng.normal(0, 5)) for i in range(10) for j in range(5)]
    a = agg.aggregate(_df(rows), reps=500, seed=3)
    b = agg.aggregate(_df(rows), reps=500, seed=3)
    pd.testing.assert_frame_equal(a, b)
    mean = a.set_index("metric").loc["Mean"]
    assert mean.ci_low < true_mean < mean.ci_high
    assert mean.ci_high - mean.ci_low < 6  # 50 runs of std 5: a tight interval
    assert (a.ci_low <= a.estimate + 1e-9).all() and (a.estimate <= a.ci_high + 1e-9).all()


def test_probability_of_improvement():
    rng = np.random.default_rng(0)
    x = rng.normal(50, 10, (5, 3))
    assert agg.probability_of_improvement(x, x) == pytest.approx(0.5)
    y = rng.normal(45, 10, (4, 3))
    assert agg.probability_of_improvement(x, y) == pytest.approx(
        metrics.probability_of_improvement(x, y))
    assert agg.probability_of_improvement(x + 1000, y) == 1.0
    rows = [(m, f"t{j}", i, x[i, j]) for m in ("td3bc", "dydiff-td3bc", "cql")
            for i in range(5) for j in range(3)]
    notes = []
    poi = agg.improvement_probabilities(_df(rows), reps=200, seed=0, notes=notes)
    assert len(poi) == 1 and poi.probability.iloc[0] == pytest.approx(0.5)
    assert poi.ci_low.iloc[0] <= 0.5 <= poi.ci_high.iloc[0]
    # A half-run pair is reported; pairs of which nothing ran (the ablations) are not.
    assert notes == ["P(dydiff-cql > cql) skipped: no runs of ['dydiff-cql']"]
    ablation = [("dydiff-td3bc-k0", f"t{j}", i, x[i, j] - 5) for i in range(5) for j in range(3)]
    poi = agg.improvement_probabilities(_df(rows + ablation), reps=200, seed=0)
    assert poi[["x", "y"]].values.tolist() == [["dydiff-td3bc", "td3bc"],
                                               ["dydiff-td3bc", "dydiff-td3bc-k0"]]
    assert poi.probability.iloc[1] > 0.5  # the full method over its ablation


def test_one_seed_one_task_and_unequal_seeds():
    df = _df([("td3bc", "hopper-medium", 0, 50.0), ("dydiff-td3bc", "hopper-medium", 0, 60.0)])
    out = agg.aggregate(df, reps=50, seed=0)
    iqm = out[out.metric == "IQM"].set_index("method")
    assert iqm.loc["dydiff-td3bc", "ci_low"] == iqm.loc["dydiff-td3bc", "ci_high"] == 60.0
    poi = agg.improvement_probabilities(df, reps=50, seed=0)
    assert poi.probability.iloc[0] == 1.0
    # unequal seeds per task -> rectangle of the first min-count seeds, with a note
    df2 = _df([("a", "t1", 0, 1.0), ("a", "t1", 1, 2.0), ("a", "t2", 0, 3.0),
               ("b", "t1", 0, 1.0), ("b", "t2", 0, 1.0), ("b", "t3", 0, 1.0)])
    notes = []
    mats = agg.score_matrices(df2, notes=notes)
    assert mats["a"].tolist() == [[1.0, 3.0]] and mats["b"].shape == (1, 2)  # t3 not shared
    assert any("['t3']" in n for n in notes) and any("unequal seed" in n for n in notes)


def test_collect_scores_errors_name_the_file(tmp_path):
    bad = tmp_path / agg.SCORE_FILE
    bad.write_text(json.dumps({"method": "td3bc", "task": "hopper-medium", "seed": 0}))
    with pytest.raises(agg.ScoreError, match="normalized_score"):
        agg.collect_scores([bad])
    (tmp_path / "empty").mkdir()
    with pytest.raises(agg.ScoreError, match="no score files"):
        agg.collect_scores([tmp_path / "empty"])
    with pytest.raises(agg.ScoreError, match="missing.json does not exist"):
        agg.collect_scores([tmp_path / "missing.json"])


def test_run_aggregate_writes_labelled_figures(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    scores = {(m, t): list(rng.normal(base, 5, 3)) for m, base in
              (("td3bc", 55), ("dydiff-td3bc", 60), ("cql", 50)) for t in
              ("hopper-medium", "walker2d-medium")}
    _write_runs(tmp_path / "runs", scores)
    figures = []
    real_save = plotting.save_figure

    def spy(fig, stem, close=True):
        figures.append(fig)
        return real_save(fig, stem, close=False)
    monkeypatch.setattr(plotting, "save_figure", spy)
    out = agg.run_aggregate([tmp_path / "runs"], tmp_path / "out", reps=100, seed=0)
    assert set(out["aggregates"].method) == {"td3bc", "dydiff-td3bc", "cql"}
    assert any("dydiff-cql" in n for n in out["notes"])
    assert len(figures) == 3
    intervals, profiles, improvement = figures
    assert all(isinstance(f, matplotlib.figure.Figure) for f in figures)
    assert [ax.get_title() for ax in intervals.axes] == [
        "IQM", "Mean", "Median", "Optimality Gap (lower is better)"]
    assert {ax.get_xlabel() for ax in intervals.axes} == {"D4RL normalised score"}
    assert intervals.axes[0].get_ylabel() == "method"
    assert [t.get_text() for t in intervals.axes[0].get_yticklabels()] == [
        "TD3+BC", "DyDiff-TD3BC", "CQL, DyDiff-CQL settings"]  # registry labels, registry order
    assert intervals._suptitle.get_text() == (
        "Aggregate scores, 95 % stratified-bootstrap CIs (2 tasks, 3 seeds/task)")
    (ax,) = profiles.axes
    assert ax.get_title() == "Performance profiles (score distributions, 95 % CIs)"
    assert ax.get_xlabel() == r"D4RL normalised score $\tau$"
    assert ax.get_ylabel() == r"fraction of runs with score $> \tau$"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["TD3+BC", "DyDiff-TD3BC", "CQL, DyDiff-CQL settings"]
    (ax,) = improvement.axes
    assert ax.get_xlabel() == "probability of improvement P(X > Y)"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["DyDiff-TD3BC > TD3+BC"]
    for stem in ("aggregate_intervals", "performance_profiles", "improvement_probability"):
        png = tmp_path / "out" / f"{stem}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert (tmp_path / "out" / f"{stem}.pdf").stat().st_size > 1000
    csv = pd.read_csv(tmp_path / "out" / "aggregates.csv")
    assert len(csv) == 3 * 4


def test_unlabelled_figure_is_refused(tmp_path):
    fig, ax = plotting.new_figure()
    ax.plot([0, 1], [0, 1])
    ax.set_title("t")
    with pytest.raises(ValueError, match="x label"):
        plotting.save_figure(fig, tmp_path / "f")
