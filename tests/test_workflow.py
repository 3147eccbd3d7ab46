"""The Snakemake DAG: dry-run job counts, schema rejection, a tiny real run, MLflow, resume."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dag_helpers import (BIN, LONGER_POLICY, ROOT, TINY, assert_same_training, env_with_bin,
                         snakemake, tail)
from harness import plan


GIT_SHA = re.compile(r"[0-9a-f]{40}(-dirty)?")  # never the fallback "unknown"
CONFIG_HASH = re.compile(r"[0-9a-f]{12}")


def job_counts(output: str) -> dict[str, int]:
    """Parse snakemake's 'Job stats' table into {rule: count}."""
    counts = {}
    block = output.split("Job stats:")[-1]
    for line in block.splitlines():
        m = re.match(r"^(\w+)\s+(\d+)\s*$", line.strip())
        if m and m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    return counts


@pytest.mark.parametrize("configfile", ["config/smoke.yaml", "config/paper.yaml"])
def test_dry_run_job_counts(configfile, tmp_path):
    cfg = plan.load_config(ROOT / configfile)
    res = snakemake("-n", "--cores", "1", "--configfile", configfile,
                    "--config", f"results_dir={tmp_path}")
    assert res.returncode == 0, res.stderr + res.stdout
    counts = job_counts(res.stdout)
    n_policy = len(cfg["tasks"]) * len(cfg["methods"]) * len(cfg["seeds"])
    assert counts["train_policy"] == n_policy
    assert counts["evaluate"] == n_policy
    model_seeds = 1 if plan.models_shared(cfg) else len(cfg["seeds"])  # smoke: shared
    assert counts["train_model"] == len(cfg["tasks"]) * len(plan.needed_models(cfg)) * model_seeds
    assert counts["analyze"] == 1
    if plan.rollout_error_enabled(cfg):
        assert counts["rollout_error"] == len(cfg["tasks"])
    if plan.data_source(cfg) == "local":
        assert sum(v for k, v in counts.items() if k.startswith("generate_")) == \
            len(plan.families(cfg))
    else:
        assert counts["import_dataset"] == len(cfg["tasks"])


def test_command_line_override_changes_the_grid(tmp_path):
    res = snakemake("-n", "--cores", "1", "--config", "seeds=[0,1,2]",
                    f"results_dir={tmp_path}")
    assert res.returncode == 0, res.stderr
    cfg = plan.load_config(ROOT / "config/smoke.yaml")
    assert job_counts(res.stdout)["train_policy"] == 3 * len(cfg["tasks"]) * len(cfg["methods"])


@pytest.mark.parametrize("override, message", [
    ("methods=[td3bc,dreamer]", "dreamer"),
    ("seeds=[-3]", "seeds"),
    ("tasks=[ant-medium]", "ant-medium"),
    ("policy={'offline':{'total_step':5}}", "total_step"),
])
def test_bad_config_stops_before_any_job(override, message, tmp_path):
    res = snakemake("-n", "--cores", "1", "--config", override, f"results_dir={tmp_path}")
    assert res.returncode != 0
    assert message in res.stderr + res.stdout
    assert not any(tmp_path.iterdir())  # nothing was run or written


def test_missing_datasets_stop_the_dag_before_any_job(tmp_path):
    res = snakemake("--cores", "1", "--config", "data={'source':'d4rl'}",
                    f"results_dir={tmp_path}",
                    env={"D4RL_DATASET_DIR": str(tmp_path / "none"), "DYDIFF_MLFLOW": "0"})
    assert res.returncode != 0
    assert "dataset(s) not found: D4RL dataset 'hopper-medium-replay-v2' not found" in res.stderr
    assert not (tmp_path / "smoke").exists()  # nothing was run or written


# ---- the tiny grid, run for real ---------------------------------------------------------

def _logs(results: Path, n: int = 3000) -> str:
    """The end of every job log, for a readable failure message."""
    return "\n".join(f"== {p}\n{p.read_text()[-n:]}"
                     for p in sorted((results / "tiny" / "logs").rglob("*.log")))


@pytest.fixture(scope="module")
def tiny_run(tiny_dag):
    return tiny_dag  # the session's one uninterrupted tiny run (conftest.py)


def test_tiny_dag_runs_end_to_end(tiny_run):
    results, cfg = tiny_run
    for path in plan.eval_paths(cfg):
        result = json.loads(Path(path).read_text())
        assert math.isfinite(result["normalized_score"])
        assert GIT_SHA.fullmatch(result["git_sha"]) and CONFIG_HASH.fullmatch(result["config_hash"])
    analysis = plan.path(cfg, "analysis_dir")
    for name in ("aggregates.csv", "summary.md", "tables/tables.md",
                 "aggregate_intervals.png", "performance_profiles.png",
                 "improvement_probability.png"):
        assert (analysis / name).stat().st_size > 0, name
    aggregates = __import__("pandas").read_csv(analysis / "aggregates.csv")
    assert set(cfg["methods"]) <= set(aggregates["method"])
    rerr = __import__("pandas").read_csv(plan.path(cfg, "rollout_error_csv", task=cfg["tasks"][0]))
    assert {"diffusion", "ensemble"} <= set(rerr["model"])
    # Each dataset's verdict and origin: its record next to it, the summary's Data table (and
    # its HTML twin, which the report shows), every table's caption.
    summary = (analysis / "summary.md").read_text()
    html = (analysis / "summary.html").read_text()
    assert "## Data" in summary and "<td>matches (" in html
    for task in cfg["tasks"]:
        rec = json.loads(plan.path(cfg, "dataset", task=task).with_suffix(".data.json")
                         .read_text())
        assert rec["origin"] == "generated" and rec["verdict"] == "matches"
        row = next(line for line in summary.splitlines() if line.startswith(f"| {task} |"))
        assert "| generated here" in row and f"| matches ({rec['sim_model']}" in row
    behaviour = json.loads(plan.path(cfg, "dataset", task=cfg["tasks"][0])
                           .with_suffix(".data.json").read_text())["behaviour"]
    assert ("vs target 5: " + ("reached" if behaviour["target_reached"] else "missed")) in summary
    assert ("**Warning: behaviour policy below its target.**" in summary) \
        == (not behaviour["target_reached"])
    assert "Warning: unchecked data" not in summary and "accepted despite" not in summary
    assert "This run's data is not that data for hopper-medium-replay (generated here" in summary
    assert "Data: hopper-medium-replay: generated here" in (analysis / "tables/tables.md").read_text()
    # A finished DAG has nothing left to do.
    res = snakemake("-n", "--cores", "1", "--configfile", str(TINY),
                    "--config", f"results_dir={results}")
    assert res.returncode == 0 and "Nothing to be done" in res.stdout + res.stderr, tail(res)


def test_tiny_run_is_in_mlflow_with_params_metrics_tags(tiny_run):
    from mlflow.tracking import MlflowClient
    from harness.tracking import default_uri
    results, cfg = tiny_run
    client = MlflowClient(default_uri(results))
    exp = client.get_experiment_by_name(cfg["name"])
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    by_name = {r.info.run_name: r for r in runs}
    # One run per job, the evaluations excepted: each lands on its training run (one row per
    # trial; tests/test_mlflow_rows.py).
    jobs = [j for j in plan.all_jobs(cfg) if j["step"] != "evaluate"]
    assert len(runs) == len(jobs) and all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags["dag_run"] for r in runs}) == 1  # one DAG invocation groups them
    task = cfg["tasks"][0]
    for method in cfg["methods"]:
        run = by_name[f"train-policy/{method}/{task}/seed0"]
        assert {k: run.data.tags[k] for k in ("method", "task", "seed")} == \
            {"method": method, "task": task, "seed": "0"}
        assert GIT_SHA.fullmatch(run.data.tags["git_sha"])
        assert CONFIG_HASH.fullmatch(run.data.tags["config_hash"])
        assert run.data.params["policy.offline.total_steps"] == "300"
        assert {k: run.data.tags[k] for k in ("data.origin", "data.verdict")} == \
            {"data.origin": "generated", "data.verdict": "matches"}
        curve = client.get_metric_history(run.info.run_id, "normalized_score")
        assert [m.step for m in curve] == [150, 300]
        assert "metrics.parquet" in {a.path for a in client.list_artifacts(run.info.run_id)}
        assert run.data.metrics["eval/normalized_score"] == json.loads(
            plan.path(cfg, "eval", method=method, task=task, seed=0).read_text()
        )["normalized_score"]
    diffusion = by_name[f"train-model/diffusion/{task}/seed0"]  # models per seed
    assert diffusion.data.tags["method"] == "diffusion"
    assert len(client.get_metric_history(diffusion.info.run_id, "diffusion_loss")) == 3


def test_changing_one_method_reruns_only_its_jobs(tiny_run):
    results, cfg = tiny_run
    res = snakemake("-n", "--cores", "1", "--configfile", str(TINY), "--config",
                    f"results_dir={results}", "policy={'methods': {'cql': {'cql': "
                    "{'cql_weight': 1.0}}}}")
    assert res.returncode == 0, tail(res)
    n = len(cfg["tasks"])  # cql on each task of the grid, nothing else
    assert job_counts(res.stdout) == {"train_policy": n, "evaluate": n, "analyze": 1, "all": 1}


def test_changing_final_episodes_reruns_only_evaluation_and_analysis(tiny_run):
    results, cfg = tiny_run
    res = snakemake("-n", "--cores", "1", "--configfile", str(TINY), "--config",
                    f"results_dir={results}", "evaluation={'final_episodes': 3}")
    assert res.returncode == 0, tail(res)
    n = len(cfg["methods"]) * len(cfg["tasks"]) * len(cfg["seeds"])
    assert job_counts(res.stdout) == {"evaluate": n, "analyze": 1, "all": 1}


def test_tiny_ablations_run_next_to_the_full_method(tiny_run, tmp_path):
    """config/ablations.yaml at test size: only the variants train; each is compared with the
    full method (P(full > variant)) and gets its family table."""
    import pandas as pd
    results, _ = tiny_run
    shutil.copytree(results / "tiny", tmp_path / "tiny")
    config = ROOT / "tests" / "configs" / "tiny-ablations.yaml"
    res = snakemake("--cores", "2", "--configfile", str(config), "--config",
                    f"results_dir={tmp_path}")
    assert res.returncode == 0, tail(res) + _logs(tmp_path)
    ran = re.findall(r"policies/([\w-]+)/[\w-]+/seed0/final\.json", res.stdout + res.stderr)
    assert set(ran) == {"dydiff-td3bc-k0", "dydiff-td3bc-k1"}  # the full method is reused
    cfg = plan.load_config(config, {"results_dir": str(tmp_path)})
    assert cfg["methods"] == ["dydiff-td3bc", "dydiff-td3bc-k0", "dydiff-td3bc-k1"]
    poi = pd.read_csv(plan.path(cfg, "analysis_dir") / "improvement.csv")
    assert poi[["x", "y"]].values.tolist() == [["dydiff-td3bc", "dydiff-td3bc-k0"],
                                               ["dydiff-td3bc", "dydiff-td3bc-k1"]]
    table = (plan.path(cfg, "tables").parent / "table_dydiff-td3bc.md").read_text()
    assert "DyDiff-TD3BC (K=0) (ours)" in table and "DyDiff-TD3BC (K=1) (ours)" in table


def _pids_running(fragment: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "dydiff-bench train-policy" in cmd and fragment in cmd:
                pids.append(int(proc.name))
    return pids


def test_killed_job_resumes_to_the_same_result(tiny_run, tmp_path):
    """kill -9 of a training job (as SLURM pre-emption or the OOM killer do): the next
    `snakemake` call resumes it from its checkpoint and ends with the same numbers."""
    results, cfg = tiny_run
    task = cfg["tasks"][0]
    out = {}
    for name in ("reference", "killed"):
        root = tmp_path / name
        shutil.copytree(plan.results_root(cfg) / "datasets", root / "tiny" / "datasets")
        target = f"{root}/tiny/policies/td3bc/{task}/seed0/final.json"
        args = ("--cores", "1", "--configfile", str(TINY), "--config", f"results_dir={root}",
                LONGER_POLICY, "--", target)
        if name == "killed":
            proc = subprocess.Popen([str(BIN / "snakemake"), *args], cwd=ROOT,
                                    env=env_with_bin(), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            ckpt = Path(target).parent / "checkpoint.pt"
            deadline = time.time() + 300
            while not ckpt.exists() and time.time() < deadline:
                time.sleep(0.05)
            assert ckpt.exists(), "the job never wrote a checkpoint"
            for pid in _pids_running(str(root)):
                os.kill(pid, signal.SIGKILL)
            assert proc.wait(timeout=120) != 0  # the job failed, so did that snakemake call
            assert not Path(target).exists()
        res = snakemake(*args)
        assert res.returncode == 0, tail(res)
        out[name] = Path(target).parent
    assert_same_training(out["reference"], out["killed"])
