"""MLflow as users compare runs: one row per trial (training curve, final evaluation, dataset
input, description), re-evaluation overwriting that row, and `dydiff-bench analyze
--from-mlflow` giving the file-based analysis byte for byte."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from dag_helpers import TINY
from harness import cli, plan, provenance, runner, runtime, tracking
from harness.training.evaluation import METRICS

mlflow = pytest.importorskip("mlflow")


def _client(results: Path):
    return mlflow.tracking.MlflowClient(tracking.default_uri(results))


def _runs(client, experiment: str, query: str = "") -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], query, max_results=1000)


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


# ---- the tiny DAG, as logged ------------------------------------------------------------

def test_one_row_per_trial_holds_curve_final_score_dataset_and_description(tiny_dag):
    results, cfg = tiny_dag
    client = _client(results)
    all_runs = _runs(client, cfg["name"])
    trials = _runs(client, cfg["name"], "tags.step = 'train-policy'")
    grid = [(m, t, s) for m in cfg["methods"] for t in cfg["tasks"] for s in cfg["seeds"]]
    assert sorted((r.data.tags["method"], r.data.tags["task"], int(r.data.tags["seed"]))
                  for r in trials) == sorted(grid)
    assert not [r.info.run_name for r in all_runs if r.data.tags["step"] == "evaluate"]
    for run in trials:
        method, task, seed = (run.data.tags[k] for k in ("method", "task", "seed"))
        evaluation = json.loads(plan.path(cfg, "eval", method=method, task=task,
                                          seed=seed).read_text())
        for key, metric in METRICS.items():
            assert run.data.metrics[metric] == evaluation[key], (run.info.run_name, metric)
        assert evaluation["eval_episodes"] == cfg["evaluation"]["final_episodes"]
        # ... next to the training curve, in the same run
        curve = client.get_metric_history(run.info.run_id, "normalized_score")
        assert [m.step for m in curve] == [150, 300]
        assert {"eval.json", "final.json", "metrics.parquet"} <= \
            {a.path for a in client.list_artifacts(run.info.run_id)}
        note = run.data.tags["mlflow.note.content"]
        assert all(x in note for x in (method, task, f"seed {seed}", cfg["name"])), note
        dataset = plan.path(cfg, "dataset", task=task)
        (given,) = run.inputs.dataset_inputs
        assert (given.dataset.name, given.dataset.digest) == (task, _digest(dataset))
        assert json.loads(given.dataset.source)["uri"] == str(dataset.resolve())
        with h5py.File(dataset, "r") as f:
            assert json.loads(given.dataset.profile)["num_rows"] == f["rewards"].shape[0]
        assert {t.key: t.value for t in given.tags}["mlflow.data.context"] == "training"
    # Model runs stay rows of their own (filter them by tags.step), with their dataset.
    models = _runs(client, cfg["name"], "tags.step = 'train-model'")
    assert sorted((r.data.tags["method"], r.data.tags["task"]) for r in models) == sorted(
        (m, t) for m in plan.needed_models(cfg) for t in cfg["tasks"])
    for task in cfg["tasks"]:
        on_task = _runs(client, cfg["name"], f"datasets.name = '{task}'")
        assert {r.info.run_id for r in trials + models if r.data.tags["task"] == task} <= \
            {r.info.run_id for r in on_task}


def test_analysis_from_mlflow_equals_the_file_analysis(tiny_dag, tmp_path):
    """The tiny DAG's own analysis (from eval.json files) and `analyze --from-mlflow` of its
    store: every table, CSV, note, figure (PNG) and the summary byte for byte."""
    results, cfg = tiny_dag
    out = tmp_path / "from-mlflow"
    assert cli.main(["analyze", "--configfile", str(TINY), "--set", f"results_dir={results}",
                     "--from-mlflow", "--out", str(out)]) == 0
    _assert_same_analysis(plan.path(cfg, "analysis_dir"), out)


def _assert_same_analysis(files_dir: Path, mlflow_dir: Path) -> None:
    # Every output but the PDFs (matplotlib stamps them with their creation time).
    names = sorted(p.relative_to(files_dir) for p in files_dir.rglob("*")
                   if p.suffix in (".csv", ".json", ".md", ".tex", ".html", ".png"))
    assert {"aggregates.csv", "improvement.csv", "scores.csv", "summary.md",
            "tables/tables.md"} <= {str(n) for n in names}
    for name in names:
        assert (mlflow_dir / name).read_bytes() == (files_dir / name).read_bytes(), name


# ---- re-evaluation, DYDIFF_MLFLOW=0 -----------------------------------------------------

def test_reevaluation_overwrites_the_trial_row_and_mlflow_off_logs_nothing(tiny_dag, tmp_path,
                                                                           monkeypatch):
    """A copy of one trained td3bc policy in a fresh store: its training run (resumed at its
    end), then `evaluate` with 1 and 2 final episodes, as after a change of
    evaluation.final_episodes; then with DYDIFF_MLFLOW=0."""
    results, cfg = tiny_dag
    task, method = cfg["tasks"][0], "td3bc"
    monkeypatch.chdir(tmp_path)  # the fresh sqlite store keeps its artefacts under ./mlruns
    root = tmp_path / "results"
    copy = root / cfg["name"] / "policies" / method / task / "seed0"
    shutil.copytree(plan.path(cfg, "policy_dir", method=method, task=task, seed=0), copy,
                    ignore=shutil.ignore_patterns("*mlflow_run_id", "eval.json"))
    shutil.copytree(plan.results_root(cfg) / "datasets", root / cfg["name"] / "datasets")

    def job(kind: str, episodes: int) -> dict:
        c = plan.load_config(TINY, {"results_dir": str(root),
                                    "evaluation": {"final_episodes": episodes}})
        spec = (plan.policy_job if kind == "train" else plan.eval_job)(c, method, task, 0)
        return plan.with_context(c, spec)

    tracking.init_experiment(plan.load_config(TINY, {"results_dir": str(root)}))
    runner.run_job(job("train", 1))
    client = _client(root)
    (trial,) = _runs(client, cfg["name"])
    for episodes in (1, 2):
        evaluation = runner.run_job(job("evaluate", episodes))
        (run,) = _runs(client, cfg["name"])  # still the one row
        assert run.info.run_id == trial.info.run_id and run.info.status == "FINISHED"
        assert run.data.metrics["eval/episodes"] == episodes
        assert run.data.metrics["eval/normalized_score"] == evaluation["normalized_score"]
        logged = Path(client.download_artifacts(run.info.run_id, "eval.json",
                                                str(tmp_path / f"dl{episodes}")))
        assert logged.read_bytes() == (copy / "eval.json").read_bytes()
        assert run.data.params["policy.offline.total_steps"] == "300"  # the training's, kept
    # MLflow's metric log is append-only: the history keeps both evaluations, the row shows
    # the newest.
    assert [m.value for m in client.get_metric_history(trial.info.run_id, "eval/episodes")] \
        == [1, 2]
    monkeypatch.setenv("DYDIFF_MLFLOW", "0")
    runner.run_job(job("evaluate", 3))
    assert json.loads((copy / "eval.json").read_text())["eval_episodes"] == 3
    (run,) = _runs(client, cfg["name"])
    assert run.data.metrics["eval/episodes"] == 2  # untouched


def test_evaluation_without_a_training_run_creates_the_trial_row(tiny_dag, tmp_path,
                                                                 monkeypatch):
    """Training ran with DYDIFF_MLFLOW=0 (no run id next to the policy): the evaluation
    creates the trial's row under the training run's name."""
    results, cfg = tiny_dag
    task, method = cfg["tasks"][0], "cql"
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "results"
    shutil.copytree(plan.path(cfg, "policy_dir", method=method, task=task, seed=0),
                    root / cfg["name"] / "policies" / method / task / "seed0",
                    ignore=shutil.ignore_patterns("*mlflow_run_id", "eval.json"))
    shutil.copytree(plan.results_root(cfg) / "datasets", root / cfg["name"] / "datasets")
    c = plan.load_config(TINY, {"results_dir": str(root)})
    tracking.init_experiment(c)
    runner.run_job(plan.with_context(c, plan.eval_job(c, method, task, 0)))
    (run,) = _runs(_client(root), cfg["name"])
    assert run.info.run_name == f"train-policy/{method}/{task}/seed0"
    assert run.info.status == "FINISHED" and run.data.tags["step"] == "train-policy"
    assert "eval/normalized_score" in run.data.metrics
    assert (root / cfg["name"] / "policies" / method / task / "seed0" / "mlflow_run_id")\
        .read_text() == run.info.run_id


# ---- several DAG invocations on one store (synthetic trials) ----------------------------

def _log_trial(root: Path, uri: str, experiment: str, method: str, task: str, seed: int,
               score: float, dag_run: str, monkeypatch) -> Path:
    """A trial as the DAG leaves it: eval.json in its policy folder, and its training run
    (tracking.job_run) holding the evaluation (tracking.trial_run), through the runner's
    tags and the evaluate step's METRICS."""
    monkeypatch.setenv("DYDIFF_DAG_RUN", dag_run)
    pdir = root / experiment / "policies" / method / task / f"seed{seed}"
    pdir.mkdir(parents=True)
    evaluation = {"method": method, "task": task, "seed": seed, "normalized_score": score,
                  "normalized_score_last10": score - 1.0, "normalized_score_best": score + 1.0,
                  "normalized_score_std": 0.0, "return_mean": 10.0 * score, "return_std": 0.0,
                  "eval_episodes": 2, "wall_time_s": 1.0,
                  # what the evaluate step records, as the runner's tags record it for MLflow
                  "environment": provenance.environment(), "device": runtime.device_record()}
    (pdir / "eval.json").write_text(json.dumps(evaluation))
    spec = {"step": "train-policy", "method": method, "task": task, "seed": seed,
            "experiment": experiment, "config": {"seed": seed}}
    with tracking.job_run(experiment=experiment, run_name=runner.run_name(spec), params={},
                          tags=runner.tags(spec), out_dir=pdir, uri=uri):
        pass
    with tracking.trial_run(experiment=experiment, run_name=runner.run_name(spec), tags={},
                            new_run_tags={}, id_file=pdir / "mlflow_run_id", uri=uri) as log_fn:
        log_fn({metric: evaluation[key] for key, metric in METRICS.items()}, 100)
    return pdir / "eval.json"


def test_runs_of_two_dag_invocations_are_analysed_together(tmp_path, monkeypatch):
    """Seeds 0-1 from one DAG invocation, seed 2 from another, into one store: the analysis
    from MLflow equals the file analysis of all eval.json files; a trial logged twice is an
    error naming both runs until --filter picks one invocation."""
    from analysis.aggregate import ScoreError
    from analysis.report import analyze_step
    monkeypatch.chdir(tmp_path)
    root, exp = tmp_path / "results", "synthetic"
    uri = tracking.default_uri(root)
    tracking.init_store(uri, exp)
    rng = np.random.default_rng(0)
    files = [_log_trial(root, uri, exp, m, t, s, float(rng.normal(50, 20)),
                        "first" if s < 2 else "second", monkeypatch)
             for m in ("td3bc", "dydiff-td3bc", "mopo")
             for t in ("hopper-medium", "walker2d-medium-replay") for s in range(3)]
    settings = {"reps": 50, "seed": 0, "name": exp}
    analyze_step({"step": "analyze", "scores": [str(f) for f in files], "rollout_error": [],
                  "out": str(tmp_path / "files"), "config": settings})
    source = {"uri": uri, "experiments": [exp], "filter": ""}
    analyze_step({"step": "analyze", "mlflow": source, "out": str(tmp_path / "mlflow"),
                  "config": settings})
    _assert_same_analysis(tmp_path / "files", tmp_path / "mlflow")
    # The same trial again from a third invocation (another results folder, same store).
    _log_trial(tmp_path / "again", uri, exp, "mopo", "hopper-medium", 0, 1.0, "third",
               monkeypatch)
    with pytest.raises(ScoreError, match="several results for the same") as err:
        analyze_step({"step": "analyze", "mlflow": source, "out": str(tmp_path / "x"),
                      "config": settings})
    assert all(x in str(err.value) for x in ("dag_run first", "dag_run third", "--filter"))
    analyze_step({"step": "analyze", "out": str(tmp_path / "filtered"), "config": settings,
                  "mlflow": {**source, "filter": "tags.dag_run != 'third'"}})
    _assert_same_analysis(tmp_path / "files", tmp_path / "filtered")
