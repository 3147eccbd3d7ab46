"""rliable statistics on the paper grid (group rliable-paper-grid, side by side): every
aggregate (IQM, mean, median, optimality gap), the performance profiles and P(improvement)
with 50,000 stratified-bootstrap replications, through rliable's per-replicate loop
(engine="rliable") and through the vectorised bootstrap (the default engine).

The grid is config/paper.yaml's methods x tasks x seeds (as its analysis step reads them) with
synthetic D4RL normalised scores (0-100 scale, a few above 100 and below 0).

Without --benchmark-enable (the normal test run) both run once at 200 replications (seconds);
the timed rliable round takes minutes.
Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/benchmarks/test_bench_rliable.py \
     --benchmark-enable --benchmark-only
"""
import numpy as np
import pandas as pd
import pytest

from analysis import aggregate as agg
from harness import plan

REPS = 50_000  # the rliable paper's
SMOKE_REPS = 200  # untimed runs
RESULTS = {}  # engine -> its outputs, compared once both ran


@pytest.fixture(scope="module")
def paper_scores():
    cfg = plan.load_config("config/paper.yaml")
    rng = np.random.default_rng(0)
    level = {(m, t): rng.uniform(10, 100) for m in cfg["methods"] for t in cfg["tasks"]}
    df = pd.DataFrame([(m, t, s, level[m, t] + rng.normal(0, 10)) for m in cfg["methods"]
                       for t in cfg["tasks"] for s in cfg["seeds"]],
                      columns=["method", "task", "seed", "normalized_score"])
    info = {"runs": len(df), "methods": len(cfg["methods"]), "tasks": len(cfg["tasks"]),
            "seeds": len(cfg["seeds"])}
    return df, info


def _all_statistics(df, engine, reps):
    """What run_aggregate computes before writing files: vectorised, one bootstrap per method
    serves its aggregates and profile; rliable, one get_interval_estimates call for each."""
    notes = []
    if engine == "vectorised":
        agg_table, (taus, profiles, cis) = agg.aggregates_and_profiles(df, reps, 0, notes)
    else:
        agg_table = agg.aggregate(df, reps=reps, seed=0, notes=notes, engine=engine)
        taus, profiles, cis = agg.performance_profiles(df, reps=reps, seed=0, engine=engine)
    poi = agg.improvement_probabilities(df, reps=reps, seed=0, notes=notes, engine=engine)
    return agg_table, (profiles, cis), poi


def _run(benchmark, paper_scores, engine, rounds):
    df, info = paper_scores
    reps = SMOKE_REPS if benchmark.disabled else REPS
    benchmark.extra_info.update(info, reps=reps)
    agg_table, (profiles, cis), poi = benchmark.pedantic(
        _all_statistics, args=(df, engine, reps), rounds=rounds, iterations=1)
    benchmark.extra_info["pairs"] = len(poi)
    assert len(agg_table) == 4 * info["methods"] and len(profiles) == info["methods"]
    assert len(poi) > 0 and (agg_table.ci_low <= agg_table.ci_high).all()
    RESULTS[engine] = agg_table, profiles, cis, poi
    if len(RESULTS) == 2:  # both engines ran: same estimates, CIs apart by Monte-Carlo error
        (a, pa, ca, ia), (b, pb, cb, ib) = RESULTS["vectorised"], RESULTS["rliable"]
        assert np.array_equal(a.estimate, b.estimate)
        assert np.array_equal(ia.probability, ib.probability)
        assert all(np.array_equal(pa[m], pb[m]) for m in pa)
        ci = ["ci_low", "ci_high"]
        benchmark.extra_info.update(
            max_ci_diff_aggregates=float(np.abs(a[ci].values - b[ci].values).max()),
            max_ci_diff_profiles=float(max(np.abs(ca[m] - cb[m]).max() for m in ca)),
            max_ci_diff_improvement=float(np.abs(ia[ci].values - ib[ci].values).max()))


@pytest.mark.benchmark(group="rliable-paper-grid")
def test_rliable_loop(benchmark, paper_scores):
    _run(benchmark, paper_scores, "rliable", rounds=1)  # minutes per round


@pytest.mark.benchmark(group="rliable-paper-grid")
def test_vectorised(benchmark, paper_scores):
    _run(benchmark, paper_scores, "vectorised", rounds=3)
