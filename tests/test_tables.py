"""Paper tables: golden Markdown/LaTeX for a fixed input, published numbers, n/a handling."""
import os
from pathlib import Path

import pandas as pd
import pytest

from analysis import tables

GOLDEN = Path(__file__).parent / "golden"


def _fixed_scores() -> pd.DataFrame:
    rows = []
    own = {"td3bc": {"hopper-medium": [55.0, 61.0, 58.0], "walker2d-medium-replay": [80.0, 70.0, 75.0]},
           "dydiff-td3bc": {"hopper-medium": [65.0, 59.0, 62.0], "walker2d-medium-replay": [72.0, 74.0, 73.0]},
           "cql": {"hopper-medium": [50.0, 52.0], "walker2d-medium-replay": [60.0, 64.0]},
           "mopo": {"hopper-medium": [40.0]}}
    for method, per_task in own.items():
        for task, vals in per_task.items():
            rows += [(method, task, seed, v) for seed, v in enumerate(vals)]
    return pd.DataFrame(rows, columns=["method", "task", "seed", "normalized_score"])


def test_published_yaml_holds_only_reference_numbers():
    pub = {p.key: p for p in tables.load_published()}
    assert pub["offlinerl-kit"].scores["td3bc"]["hopper-medium-replay"] == (67.3, 13.2)
    assert pub["corl"].scores["cql-corl"]["walker2d-medium-replay"] == (73.09, 13.22)
    maze = {m: {t: v for t, v in cells.items() if t.startswith("maze2d")}
            for m, cells in pub["corl"].scores.items()}
    assert maze == {  # CORL README.md:78-80 (TD3+BC, CQL columns)
        "td3bc": {"maze2d-umaze": (29.41, 12.31), "maze2d-medium": (59.45, 36.25),
                  "maze2d-large": (97.10, 25.41)},
        "cql-corl": {"maze2d-umaze": (-8.90, 6.11), "maze2d-medium": (86.11, 9.68),
                     "maze2d-large": (23.75, 36.70)}}
    assert pub["mopo-paper"].scores == {"mopo": {"halfcheetah-random": (35.4, 2.5)},
                                        "mbpo": {"halfcheetah-random": (30.7, 3.9)}}
    assert all(not cells for cells in pub["dydiff-paper"].scores.values())
    assert all(p.source for p in pub.values())


def test_tables_match_golden_files():
    out = tables.make_tables(_fixed_scores(), tables.load_published())
    assert set(out) == {"td3bc", "cql", "overall"}
    for name, t in out.items():
        for kind, ext in (("markdown", "md"), ("latex", "tex")):
            path = GOLDEN / f"table_{name}.{ext}"
            if os.environ.get("UPDATE_GOLDEN"):
                path.write_text(t[kind])
            assert t[kind] == path.read_text(), f"{path} differs (UPDATE_GOLDEN=1 to refresh)"


def test_table_content():
    t = tables.make_tables(_fixed_scores(), tables.load_published())
    md = t["td3bc"]["markdown"]
    # own runs: mean ± sample std; the best own run per row is bold
    assert "| hopper-medium | 58.0 ± 3.0 | **62.0 ± 3.0** | 60.8 ± 3.4 | 60.4 ± 3.5 | n/a |" in md
    assert "| walker2d-medium-replay | **75.0 ± 5.0** | 73.0 ± 1.0 |" in md
    assert "TD3+BC 3 seeds" in md and "n/a" in md
    cql = t["cql"]["markdown"]
    # published CQL columns sit next to the preset with that source's settings
    assert ("| task | CQL, DyDiff-CQL settings (ours) | DyDiff-CQL (DyDiff paper) | "
            "CQL, CORL settings (CORL) | CQL, OfflineRL-Kit settings (OfflineRL-Kit) |") in cql
    assert "| hopper-medium | **51.0 ± 1.4** | n/a | 59.1 ± 3.8 | 59.1 ± 4.1 |" in cql
    overall = t["overall"]["markdown"]
    assert "| walker2d-medium-replay |" in overall and "| – |" in overall  # MOPO not run there
    assert "MOPO 1 seed" in overall
    latex = t["td3bc"]["latex"]
    assert r"\toprule" in latex and r"\textbf{62.0 $\pm$ 3.0}" in latex


def test_maze2d_rows_sit_next_to_corls_maze2d_numbers():
    """maze2d rows in maze order after the MuJoCo ones; CORL's -v1 maze2d numbers in CORL's
    column (its caption names both dataset versions); the DyDiff paper's n/a."""
    rows = [(m, t, seed, v) for m, base in (("td3bc", 40.0), ("dydiff-td3bc", 50.0),
                                            ("cql-corl", 30.0))
            for t in ("maze2d-large", "hopper-medium", "maze2d-umaze", "maze2d-medium")
            for seed, v in enumerate((base, base + 2.0))]
    df = pd.DataFrame(rows, columns=["method", "task", "seed", "normalized_score"])
    out = tables.make_tables(df, tables.load_published())
    td3 = out["td3bc"]["table"]
    assert [t for t, _ in td3["rows"]] == ["hopper-medium", "maze2d-umaze", "maze2d-medium",
                                           "maze2d-large"]
    cells = {t: dict(zip(td3["columns"], c)) for t, c in td3["rows"]}
    assert cells["maze2d-umaze"]["TD3+BC (ours)"] == "41.0 ± 1.4"
    assert cells["maze2d-umaze"]["TD3+BC (CORL)"] == "29.4 ± 12.3"
    assert cells["maze2d-large"]["TD3+BC (CORL)"] == "97.1 ± 25.4"
    assert cells["hopper-medium"]["TD3+BC (CORL)"] == "60.4 ± 3.5"
    assert cells["maze2d-umaze"]["TD3+BC (OfflineRL-Kit)"] == tables.NA
    assert cells["maze2d-medium"]["DyDiff-TD3BC (DyDiff paper)"] == tables.NA
    rules = dict(zip(td3["columns"], td3["rules"]))
    assert rules["TD3+BC (CORL)"] == "last eval"
    assert "Maze2d table, D4RL maze2d -v1" in out["td3bc"]["markdown"]
    cql = {t: dict(zip(out["cql"]["table"]["columns"], c)) for t, c in out["cql"]["table"]["rows"]}
    assert cql["maze2d-umaze"]["CQL, CORL settings (CORL)"] == "-8.9 ± 6.1"
    assert cql["maze2d-umaze"]["CQL, CORL settings (ours)"] == "31.0 ± 1.4"
    # maze2d alone: the published columns' last row is CORL's maze2d average (README: 61.99,
    # 33.65)
    maze = tables.make_tables(df[df.task != "hopper-medium"], tables.load_published())
    summary = dict(zip(maze["td3bc"]["table"]["columns"], maze["td3bc"]["table"]["summary"]))
    assert summary["TD3+BC (CORL)"] == "62.0"
    assert summary["TD3+BC (OfflineRL-Kit)"] == tables.NA
    summary = dict(zip(maze["cql"]["table"]["columns"], maze["cql"]["table"]["summary"]))
    assert summary["CQL, CORL settings (CORL)"] == "33.7"


def test_bad_published_file_names_the_key(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("x:\n  label: X\n  source: s\n  scores:\n    td3bc:\n      hopper-medium: 50\n")
    with pytest.raises(tables.PublishedError, match="x.scores.td3bc.hopper-medium"):
        tables.load_published(bad)


def test_run_tables_writes_files(tmp_path):
    import json
    d = tmp_path / "runs" / "td3bc" / "seed0"
    d.mkdir(parents=True)
    (d / "eval.json").write_text(json.dumps({"method": "td3bc", "task": "hopper-medium",
                                              "seed": 0, "normalized_score": 50.0}))
    tables.run_tables([tmp_path / "runs"], tmp_path / "out")
    assert "| hopper-medium | **50.0** |" in (tmp_path / "out" / "table_td3bc.md").read_text()
    assert (tmp_path / "out" / "table_overall.tex").exists()
    assert not (tmp_path / "out" / "table_cql.md").exists()


def test_summary_is_generated_from_the_data(tmp_path):
    import json
    from analysis.aggregate import run_aggregate
    from analysis.summary import write_summary
    for m, vals in (("td3bc", [50.0, 52.0]), ("dydiff-td3bc", [70.0, 72.0])):
        for task in ("hopper-medium", "walker2d-medium"):
            for seed, v in enumerate(vals):
                d = tmp_path / "runs" / m / task / f"seed{seed}"
                d.mkdir(parents=True)
                (d / "eval.json").write_text(json.dumps(
                    {"method": m, "task": task, "seed": seed, "normalized_score": v}))
    agg = run_aggregate([tmp_path / "runs"], tmp_path / "agg", reps=100, seed=0)
    tab = tables.run_tables([tmp_path / "runs"], tmp_path / "tab")
    text = write_summary(agg, tab, None, tmp_path / "summary.md", budget="smoke")
    assert (tmp_path / "summary.md").read_text() == text
    assert "DyDiff-TD3BC's IQM is 71.0 [70.0, 72.0] vs TD3+BC's 51.0 [50.0, 52.0]" in text
    # Every DyDiff run beats every TD3+BC run: the interval collapses to [1.00, 1.00], which
    # measures no uncertainty, so no difference is claimed.
    assert "P(DyDiff-TD3BC > TD3+BC) = 1.00 [1.00, 1.00]" in text
    assert "a collapsed interval per task" in text and "support no claim" in text
    assert "distinguishable" not in text
    assert "Only 2 run(s) per task" in text and "'smoke'" in text
    assert "DyDiff-TD3BC has the higher mean on 2 of 2" in text
    assert "No rollout-error study" in text


def _write_runs(root, scores: dict) -> None:
    import json
    for m, vals in scores.items():
        for task in ("hopper-medium", "walker2d-medium"):
            for seed, v in enumerate(vals):
                d = root / m / task / f"seed{seed}"
                d.mkdir(parents=True)
                (d / "eval.json").write_text(json.dumps(
                    {"method": m, "task": task, "seed": seed, "normalized_score": v}))


def test_summary_claims_a_difference_only_where_the_interval_supports_it(tmp_path):
    from analysis.aggregate import run_aggregate
    from analysis.summary import write_summary
    # One run per task: a point, whatever the scores.
    _write_runs(tmp_path / "one", {"td3bc": [40.0], "dydiff-td3bc": [90.0]})
    agg = run_aggregate([tmp_path / "one"], tmp_path / "agg1", reps=100, seed=0)
    text = write_summary(agg, None, None, tmp_path / "s1.md", models_shared=True)
    assert "a single run per task" in text and "support no claim" in text
    assert "distinguishable" not in text and "better" not in text
    assert "shared by every seed" in text and "leave out model-training variance" in text
    # Five overlapping runs per task, DyDiff mostly higher: a real interval above 0.5.
    _write_runs(tmp_path / "five", {"td3bc": [50.0, 52.0, 54.0, 56.0, 58.0],
                                    "dydiff-td3bc": [55.0, 57.0, 59.0, 61.0, 63.0]})
    agg = run_aggregate([tmp_path / "five"], tmp_path / "agg5", reps=2000, seed=0)
    poi = agg["improvement"].iloc[0]
    assert 0.5 < poi.ci_low < poi.ci_high
    text = write_summary(agg, None, None, tmp_path / "s5.md", models_shared=False)
    assert "statistically distinguishable" in text
    assert "include model-training variance" in text


def test_score_rule_picks_the_number_and_each_column_states_its_rule(tmp_path):
    """analysis.score_rule: 'final' (the final evaluation, CORL's 'last') or 'last10' (the mean
    of the last 10 training evaluations, OfflineRL-Kit's); each table column says which."""
    import json
    from analysis.aggregate import ScoreError, collect_scores
    d = tmp_path / "runs" / "td3bc" / "hopper-medium" / "seed0"
    d.mkdir(parents=True)
    (d / "eval.json").write_text(json.dumps({"method": "td3bc", "task": "hopper-medium",
                                             "seed": 0, "normalized_score": 60.0,
                                             "normalized_score_last10": 55.0}))
    assert collect_scores([tmp_path / "runs"]).normalized_score.tolist() == [60.0]
    assert collect_scores([tmp_path / "runs"], "last10").normalized_score.tolist() == [55.0]
    tab = tables.run_tables([tmp_path / "runs"], tmp_path / "tab", rule="last10")
    t = tab["td3bc"]["table"]
    rules = dict(zip(t["columns"], t["rules"]))
    assert rules["TD3+BC (ours)"] == "mean of last 10 evals"
    assert rules["TD3+BC (CORL)"] == "last eval"
    assert rules["TD3+BC (OfflineRL-Kit)"] == "mean of last 10 evals"
    assert "| *score rule* | *mean of last 10 evals* |" in tab["td3bc"]["markdown"]
    assert "models trained per seed" not in tab["td3bc"]["markdown"]  # not said when unknown
    # A model-free grid's captions say nothing of model-based runs (it has none) ...
    shared = tables.run_tables([tmp_path / "runs"], tmp_path / "tab2", models_shared=True)
    assert "model-based" not in shared["overall"]["markdown"]
    # ... a grid with a model-based method says how its models were trained.
    m = tmp_path / "runs" / "mopo" / "hopper-medium" / "seed0"
    m.mkdir(parents=True)
    (m / "eval.json").write_text(json.dumps({"method": "mopo", "task": "hopper-medium",
                                             "seed": 0, "normalized_score": 50.0}))
    shared = tables.run_tables([tmp_path / "runs"], tmp_path / "tab2", models_shared=True)
    assert "one model per task shared by every seed" in shared["overall"]["markdown"]
    per_seed = tables.run_tables([tmp_path / "runs"], tmp_path / "tab3", models_shared=False)
    assert "models trained per seed" in per_seed["overall"]["latex"]
    assert "model-based" not in per_seed["td3bc"]["latex"]
    m.joinpath("eval.json").unlink()
    (d / "eval.json").write_text(json.dumps({"method": "td3bc", "task": "hopper-medium",
                                             "seed": 0, "normalized_score": 60.0}))
    with pytest.raises(ScoreError, match=r"lacks key\(s\) \['normalized_score_last10'\] "
                                         r"\(analysis.score_rule: last10\)"):
        collect_scores([tmp_path / "runs"], "last10")


def test_last_ten_evaluations_are_read_from_the_training_table(tmp_path):
    """OfflineRL-Kit's rule on our table: rows without a score (log-only rows) are skipped."""
    from harness.training.evaluation import last_evaluations
    scores = [float(s) for s in range(12)]
    rows = [{"step": 10 * i, "normalized_score": v} for i, v in enumerate(scores)]
    rows.insert(3, {"step": 25, "normalized_score": float("nan")})
    pd.DataFrame(rows).to_parquet(tmp_path / "metrics.parquet")
    got = last_evaluations(tmp_path / "metrics.parquet")
    assert got == {"normalized_score_last10": sum(scores[2:]) / 10, "last10_evaluations": 10}
    pd.DataFrame(rows[:3]).to_parquet(tmp_path / "few.parquet")
    assert last_evaluations(tmp_path / "few.parquet") == {"normalized_score_last10": 1.0,
                                                          "last10_evaluations": 3}


def test_best_rule_is_the_max_over_training_evaluations_and_labelled(tmp_path):
    """Diffusion-QL's published rule (--ms online, main.py:122-132): the best evaluation during
    training; its column says so, and one analysis uses one rule for all our columns."""
    import json
    from analysis.aggregate import ScoreError, collect_scores
    from harness.training.evaluation import best_evaluation
    rows = [{"step": 10, "normalized_score": 3.0}, {"step": 15, "normalized_score": float("nan")},
            {"step": 20, "normalized_score": 9.0}, {"step": 30, "normalized_score": 9.0},
            {"step": 40, "normalized_score": 1.0}]
    pd.DataFrame(rows).to_parquet(tmp_path / "metrics.parquet")
    assert best_evaluation(tmp_path / "metrics.parquet") == {"normalized_score_best": 9.0,
                                                             "best_evaluation_step": 20}
    pd.DataFrame(rows[1:2]).to_parquet(tmp_path / "none.parquet")
    with pytest.raises(ValueError, match="no evaluation during training"):
        best_evaluation(tmp_path / "none.parquet")
    for method, best in (("td3bc", 70.0), ("diffql", 80.0)):
        d = tmp_path / "runs" / method / "hopper-medium" / "seed0"
        d.mkdir(parents=True)
        (d / "eval.json").write_text(json.dumps({
            "method": method, "task": "hopper-medium", "seed": 0, "normalized_score": 60.0,
            "normalized_score_last10": 55.0, "normalized_score_best": best}))
    assert collect_scores([tmp_path / "runs"], "best").normalized_score.tolist() == [80.0, 70.0]
    tab = tables.run_tables([tmp_path / "runs"], tmp_path / "tab", rule="best")
    for family in ("td3bc", "diffql"):
        t = tab[family]["table"]
        own = [r for c, r in zip(t["columns"], t["rules"]) if c.endswith("(ours)")]
        assert own and set(own) == {"best eval during training"}, family
    (tmp_path / "runs" / "td3bc" / "hopper-medium" / "seed0" / "eval.json").write_text(
        json.dumps({"method": "td3bc", "task": "hopper-medium", "seed": 0,
                    "normalized_score": 60.0}))
    with pytest.raises(ScoreError, match=r"\(analysis.score_rule: best\)"):
        collect_scores([tmp_path / "runs"], "best")
