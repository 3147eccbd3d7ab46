"""The vectorised stratified bootstrap (analysis.aggregate, engine="vectorised") against
rliable's own (engine="rliable"): identical point estimates; on rliable's own index stream the
same replicates, hence the same CIs; with independent draws, CIs within Monte-Carlo error."""
import numpy as np
import pandas as pd
import pytest
from rliable import library as rly

from analysis import aggregate as agg

TAUS = np.linspace(0, 100, 21)


def _df(mats: dict) -> pd.DataFrame:
    """{method: (runs, tasks) scores} -> score rows (tasks t0, t1, ...)."""
    return pd.DataFrame([(m, f"t{j}", i, float(s[i, j])) for m, s in mats.items()
                         for i in range(s.shape[0]) for j in range(s.shape[1])],
                        columns=["method", "task", "seed", "normalized_score"])


@pytest.fixture(scope="module")
def mats():
    """A compared pair with unequal run counts (5 vs 3), integer scores (ties within and
    across methods, some above the optimality threshold 100), and a method with one run (a
    method's matrix is a rectangle, score_matrices: one run on a task = one run on each)."""
    rng = np.random.default_rng(0)
    return {"dydiff-td3bc": np.round(rng.normal(70, 25, (5, 4))),
            "td3bc": np.round(rng.normal(60, 25, (3, 4))),
            "cql": np.round(rng.normal(50, 10, (1, 4)))}


def _legacy_indices(shapes, reps, seed):
    """The index arrays rliable draws for one key: np.random.seed(seed), then per replicate
    np.random.choice(runs, (runs, tasks)) for each array in turn (StratifiedBootstrap /
    StratifiedIndependentBootstrap.update_indices)."""
    np.random.seed(seed)
    draws = [[np.random.choice(s[0], s, replace=True) for s in shapes] for _ in range(reps)]
    return [np.stack(d) for d in zip(*draws)]


def test_point_estimates_identical_to_rliable(mats):
    df = _df(mats)
    kw = dict(reps=20, seed=0)
    a = agg.aggregate(df, **kw)
    b = agg.aggregate(df, engine="rliable", **kw)
    assert np.array_equal(a.estimate, b.estimate)
    assert a[["method", "metric", "n_runs", "n_tasks"]].equals(
        b[["method", "metric", "n_runs", "n_tasks"]])
    assert a.estimate.nunique() > 8  # the methods differ: a real comparison
    _, pa, _ = agg.performance_profiles(df, taus=TAUS, **kw)
    _, pb, _ = agg.performance_profiles(df, taus=TAUS, engine="rliable", **kw)
    assert all(np.array_equal(pa[m], pb[m]) for m in mats)
    ia = agg.improvement_probabilities(df, **kw)
    ib = agg.improvement_probabilities(df, engine="rliable", **kw)
    assert ia[["x", "y", "n_runs_x", "n_runs_y"]].values.tolist() == [
        ["dydiff-td3bc", "td3bc", 5, 3]]
    assert np.array_equal(ia.probability, ib.probability)


def test_same_indices_as_rliable_give_its_cis(mats):
    """Fed rliable's own index stream, the batched metrics reproduce its replicates, so the
    percentile CIs agree: exactly for everything but IQM, whose sorted (not partitioned)
    slice only reorders the sum (1e-12 relative)."""
    reps, seed = 300, 4
    # 20, 12 and 15 scores: trim_mean cuts int(0.25 n) = 5, 3 and 3 (3.75 rounded down)
    for method, scores in [*mats.items(), ("dydiff-td3bc", mats["dydiff-td3bc"][:, :3])]:
        if len(scores) == 1:
            continue  # one run: the collapse test
        (idx,) = _legacy_indices([scores.shape], reps, seed)
        ci = agg.percentile_ci(agg.metric_replicates(scores, idx))
        _, ref = agg._rliable_metrics(scores, reps, seed)
        np.testing.assert_allclose(ci[:, 0], ref[:, 0], rtol=1e-12, atol=0)
        assert np.array_equal(ci[:, 1:], ref[:, 1:])
        assert not np.array_equal(ci[0], ci[1])  # a real interval, not a collapsed one
        ci = agg.percentile_ci(agg.profile_replicates(scores, idx, TAUS))
        np.random.seed(seed)
        _, ref = rly.create_performance_profile({method: scores}, TAUS, reps=reps,
                                                custom_profile_func=agg._profile)
        assert np.array_equal(ci, ref[method])
    x, y = mats["dydiff-td3bc"], mats["td3bc"]
    ix, iy = _legacy_indices([x.shape, y.shape], reps, seed)
    ci = agg.percentile_ci(agg.improvement_replicates(x, y, ix, iy))
    _, ref = agg.pair_bootstrap(x, y, reps, seed, engine="rliable")
    assert np.array_equal(ci, ref) and ci[0] < ci[1]


def _quantile_band(values, p, reps, z=5.0):
    """Q(p + z d) - Q(p - z d), d = sqrt(p (1 - p) / R), from the (R, ...) replicates.

    A percentile estimated from R replicates has its rank in the true bootstrap distribution
    ~ Binomial(R, p) / R, of standard deviation d; so both engines' estimates of the p-quantile
    lie between the true quantiles at p -+ z d (z = 5: each misses with probability ~6e-7),
    and their difference is below that band's width. Distribution-free: it holds for the lattice
    distributions of profiles and P(improvement), where a normal-density error bound does not."""
    d = np.sqrt(p * (1 - p) / reps)
    return np.quantile(values, min(1.0, p + z * d), axis=0) - np.quantile(
        values, max(0.0, p - z * d), axis=0)


def test_cis_within_monte_carlo_error_of_rliable(mats):
    """Both engines at R = 20,000 with their own random streams: x's metrics and profile, and
    P(x > y) (y's own CIs: the exact-stream test above)."""
    reps, seed, alpha = 20_000, 1, (1 - agg.CI_SIZE) / 2
    x, y = mats["dydiff-td3bc"], mats["td3bc"]
    values = agg.bootstrap_replicates(  # the replicates method_bootstrap draws
        lambda idx: np.concatenate([agg.metric_replicates(x, idx),
                                    agg.profile_replicates(x, idx, TAUS)], 1),
        [x.shape], reps, np.random.default_rng(seed))
    _, ci = agg.method_bootstrap(x, reps, seed, TAUS)
    assert np.array_equal(ci, agg.percentile_ci(values))
    _, ref = agg._rliable_metrics(x, reps, seed)
    np.random.seed(seed)
    _, prof = rly.create_performance_profile({"m": x}, TAUS, reps=reps,
                                             custom_profile_func=agg._profile)
    cases = [(ci, np.concatenate([ref, prof["m"]], 1), values)]
    values = agg.bootstrap_replicates(lambda ix, iy: agg.improvement_replicates(x, y, ix, iy),
                                      [x.shape, y.shape], reps, np.random.default_rng(seed))
    _, ci = agg.pair_bootstrap(x, y, reps, seed)
    _, ref = agg.pair_bootstrap(x, y, reps, seed, engine="rliable")
    cases.append((ci, ref, values))
    worst = 0.0
    for ci, ref, values in cases:
        bound = np.stack([_quantile_band(values, alpha, reps),
                          _quantile_band(values, 1 - alpha, reps)]) + 1e-9
        diff = np.abs(ci - ref)
        assert (diff <= bound).all(), (diff / bound).max()
        worst = max(worst, float(diff.max()))
    assert 0 < worst < 5  # independent draws: different, and close (0-100 scale)


def test_one_run_per_task_collapses_the_ci(mats):
    scores = mats["cql"]
    point, ci = agg.method_bootstrap(scores, 50, 0, TAUS)
    assert np.array_equal(ci, np.stack([point, point]))
    _, ref = agg._rliable_metrics(scores, 50, 0)
    assert np.array_equal(ci[:, :4], ref)
    one = np.array([[50.0, 50.0]])
    p, ci = agg.pair_bootstrap(one, one + 1, 50, 0)
    assert p == 0.0 and ci.tolist() == [0.0, 0.0]
    p, ci = agg.pair_bootstrap(one, np.array([[40.0, 60.0], [60.0, 40.0], [50, 50]]), 200, 0)
    assert p == 0.5 and ci[0] < 0.5 < ci[1]  # one run of x, but y is resampled


def test_ties_count_half():
    x = np.array([[50.0, 10.0], [60.0, 20.0]])
    p, ci = agg.pair_bootstrap(x, x.copy(), 200, 0)  # one pair ahead, one behind, two tied
    assert p == 0.5 and 0.0 < ci[0] < 0.5 < ci[1] < 1.0
    p, ci = agg.pair_bootstrap(np.full((3, 2), 40.0), np.full((2, 2), 40.0), 200, 0)
    assert p == 0.5 and ci.tolist() == [0.5, 0.5]  # every resampled pair ties


def test_one_bootstrap_serves_aggregates_and_profiles(mats):
    df = _df(mats)
    notes = []
    both, (taus, prof, cis) = agg.aggregates_and_profiles(df, reps=500, seed=3, notes=notes)
    pd.testing.assert_frame_equal(both, agg.aggregate(df, reps=500, seed=3))
    taus2, prof2, cis2 = agg.performance_profiles(df, reps=500, seed=3)
    assert np.array_equal(taus, taus2)
    assert all(np.array_equal(prof[m], prof2[m]) and np.array_equal(cis[m], cis2[m])
               for m in mats)
    assert notes == []  # every method has the same runs on every task


def test_seeded_and_chunked(mats, monkeypatch):
    scores = mats["dydiff-td3bc"]
    a = agg.method_bootstrap(scores, 300, 7, TAUS)
    assert all(np.array_equal(u, v) for u, v in zip(a, agg.method_bootstrap(scores, 300, 7, TAUS)))
    assert not np.array_equal(a[1], agg.method_bootstrap(scores, 300, 8, TAUS)[1])
    # chunks: consecutive draws of the same Generator, the last one partial, in order
    per_rep = 8 * 8 * scores.size
    monkeypatch.setattr(agg, "CHUNK_BYTES", 7 * per_rep)
    got = agg.bootstrap_replicates(lambda idx: idx, [scores.shape], 20,
                                   np.random.default_rng(0))
    rng = np.random.default_rng(0)
    want = np.concatenate([agg.stratified_indices(rng, scores.shape, n) for n in (7, 7, 6)])
    assert np.array_equal(got, want)
    assert got.min() == 0 and got.max() == scores.shape[0] - 1


def test_bad_engine_and_reps():
    df = _df({"td3bc": np.ones((2, 2))})
    with pytest.raises(ValueError, match="engine must be one of .* got 'torch'"):
        agg.aggregate(df, engine="torch")
    with pytest.raises(ValueError, match="reps must be >= 1, got 0"):
        agg.method_bootstrap(np.ones((2, 2)), 0, 0)
