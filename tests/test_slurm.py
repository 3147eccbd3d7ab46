"""The `slurm` profile against a real SLURM: a single-node slurmctld + slurmd + slurmdbd on
loopback (workflow/ci/slurm-up.sh) and an authenticated MLflow server on 127.0.0.1 (basic-auth).

- the smoke DAG runs to completion with the exact user command `snakemake --cores all --profile
  slurm` from a repository root; its jobs are seen in squeue while they run and in sacct after,
  each with the threads/memory/runtime the workflow asked for; their logs are under
  results/logs/slurm/; every job's run is in the MLflow server, with its metrics;
- a training job cancelled with `scancel` is retried by Snakemake, resumes from its checkpoint
  and ends with the numbers of an uninterrupted run.

Runs where it can: root on Debian with a package registry for apt-get (CI). Elsewhere it skips
and says why (pytest -ra prints the reason); DYDIFF_SLURM_TEST=0 turns it off.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests

import mlflow_server as tracking_server
from dag_helpers import (LONGER_POLICY, ROOT, assert_same_training, copy_repo, env_with_bin,
                         snakemake, tail)
from harness import plan

pytestmark = pytest.mark.slurm
UP, DOWN = ROOT / "workflow/ci/slurm-up.sh", ROOT / "workflow/ci/slurm-down.sh"


SKIPPED = "SLURM integration test skipped: "


def skip_unless_possible() -> None:
    """Skip (with the reason) where slurm-up.sh cannot run or the user turned the test off."""
    if os.environ.get("DYDIFF_SLURM_TEST", "1") == "0":
        pytest.skip(SKIPPED + "DYDIFF_SLURM_TEST=0")
    if os.geteuid() != 0:
        pytest.skip(SKIPPED + "needs root (slurm-up.sh installs Debian's slurm-wlm and starts "
                    "its daemons)")
    if not (Path("/etc/debian_version").exists() and shutil.which("apt-get")):
        pytest.skip(SKIPPED + "needs Debian/Ubuntu with apt-get")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def cluster():
    """A running single-node cluster; stopped (exactly its daemons) after the module."""
    skip_unless_possible()
    # Not pytest's tmp_path: that is private to root, and MariaDB runs as the mysql user.
    state = Path(tempfile.mkdtemp(prefix="dydiff-slurm-"))
    state.chmod(0o755)
    start = time.monotonic()
    up = subprocess.run(["bash", str(UP), str(state)], capture_output=True, text=True,
                        timeout=900)
    if up.returncode in (2, 3):  # not possible here / no package registry: say so, skip
        pytest.skip(SKIPPED + up.stderr.strip().splitlines()[-1])
    assert up.returncode == 0, up.stdout + up.stderr
    print(f"\nslurm-up: {time.monotonic() - start:.1f} s")
    pids = [int(line.split()[1]) for line in (state / "started.pids").read_text().splitlines()]
    yield state
    start = time.monotonic()
    down = subprocess.run(["bash", str(DOWN), str(state)], capture_output=True, text=True,
                          timeout=300)
    print(f"slurm-down: {time.monotonic() - start:.1f} s")
    assert down.returncode == 0, down.stderr
    assert not [pid for pid in pids if _alive(pid)], "slurm-down.sh left daemons running"
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """The README's cluster tracking server: MLflow's basic-auth app on 127.0.0.1 (sqlite
    backend, artefacts in a shared folder) and one user for the jobs. Yields its URI and the
    jobs' credentials, which reach them as environment variables only."""
    skip_unless_possible()
    server = tracking_server.start(tmp_path_factory.mktemp("mlflow-server"))
    try:
        refused = requests.post(f"{server.uri}/api/2.0/mlflow/experiments/search", json={},
                                timeout=30)
        assert refused.status_code == 401, refused.text[:500]  # no credentials, no access
        yield server.uri, server.create_user("dydiff-jobs")
    finally:
        server.stop()


class QueueWatcher(threading.Thread):
    """Polls squeue once a second: {slurm job id: set of states seen} while the DAG runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.seen: dict[str, set[str]] = {}
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            out = subprocess.run(["squeue", "-h", "-o", "%i|%T"], capture_output=True,
                                 text=True).stdout
            for line in out.splitlines():
                job, state = line.split("|")
                self.seen.setdefault(job, set()).add(state)
            self.stop.wait(1.0)


def sacct(*ids: str) -> dict[str, dict[str, str]]:
    fields = ["JobIDRaw", "State", "ReqMem", "ReqCPUS", "Timelimit", "Comment"]
    out = subprocess.run(["sacct", "-X", "--parsable2", "--noheader", "--jobs", ",".join(ids),
                          f"--format={','.join(fields)}"],
                         capture_output=True, text=True, check=True).stdout
    return {row[0]: dict(zip(fields, row)) for row in
            (line.split("|") for line in out.splitlines())}


def submitted_jobs(log: str) -> list[dict]:
    """Each SLURM submission in Snakemake's output, in order: rule, threads, resources (from the
    job's block, matched by Snakemake's job id), SLURM job id and log file."""
    blocks = {}
    for block in re.split(r"\n(?=\[\w{3} \w{3} +\d+ [\d:]+ \d{4}\]\n)", log):
        rule = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        jobid = re.search(r"^\s+jobid: (\d+)$", block, re.M)
        if not (rule and jobid):
            continue
        res = dict(kv.split("=", 1) for kv in
                   re.search(r"^\s+resources: (.*)$", block, re.M).group(1).split(", "))
        threads = re.search(r"^\s+threads: (\d+)$", block, re.M)
        blocks[jobid.group(1)] = {"rule": rule.group(1), "mem_mb": int(res["mem_mb"]),
                                  "runtime": int(res["runtime"]),
                                  "threads": int(threads.group(1)) if threads else 1}
    return [{**blocks[m.group(1)], "slurm_id": m.group(2), "log": Path(m.group(3))}
            for m in re.finditer(r"^Job (\d+) has been submitted with SLURM jobid (\d+) "
                                 r"\(log: (.+?)\)\.?$", log, re.M)]


def minutes(timelimit: str) -> int:
    """sacct's [D-]HH:MM:SS as minutes."""
    days, _, clock = timelimit.rpartition("-")
    h, m, s = (int(x) for x in clock.split(":"))
    return (int(days or 0) * 24 + h) * 60 + m + s // 60


def test_smoke_dag_on_slurm(cluster, mlflow_server, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    uri, creds = mlflow_server
    repo = copy_repo(tmp_path / "repo")
    dag_run = uuid.uuid4().hex[:12]
    watcher = QueueWatcher()
    watcher.start()
    start = time.monotonic()
    res = subprocess.run(["snakemake", "--cores", "all", "--profile", "slurm"], cwd=repo,
                         env=env_with_bin({"MLFLOW_TRACKING_URI": uri, **creds,
                                           "DYDIFF_DAG_RUN": dag_run}),
                         capture_output=True, text=True, timeout=4800)
    wall = time.monotonic() - start
    watcher.stop.set()
    watcher.join()
    (tmp_path / "snakemake.log").write_text(res.stdout + res.stderr)
    assert res.returncode == 0, tail(res, 8000)
    print(f"smoke DAG on SLURM: {wall:.0f} s")

    cfg = plan.load_config(repo / "config/smoke.yaml", {"results_dir": str(repo / "results")})
    for path in plan.eval_paths(cfg):
        assert math.isfinite(json.loads(Path(path).read_text())["normalized_score"])
    assert plan.path(cfg, "summary").stat().st_size > 0

    submitted = submitted_jobs(res.stdout + res.stderr)
    # Every job of the grid (datasets, models, policies, evaluations, the rollout-error study
    # per task, the analysis): each a SLURM job; each an MLflow run but the evaluations.
    n_jobs = len(plan.all_jobs(cfg))
    assert len(submitted) == n_jobs
    accounting = sacct(*(job["slurm_id"] for job in submitted))
    for job in submitted:
        row = accounting[job["slurm_id"]]
        assert row["State"] == "COMPLETED", (job, row)
        # The profile passed the workflow's per-rule resources to sbatch.
        assert row["ReqMem"] == f"{job['mem_mb']}M", (job, row)
        assert minutes(row["Timelimit"]) == job["runtime"], (job, row)
        assert int(row["ReqCPUS"]) == job["threads"], (job, row)
        assert row["Comment"].startswith(f"rule_{job['rule']}"), (job, row)
        # squeue showed it while it waited or ran (not only as finished).
        assert watcher.seen.get(job["slurm_id"], set()) & {"PENDING", "RUNNING"}, job
        log = job["log"]
        assert log.is_relative_to(repo / "results/logs/slurm") and log.stat().st_size > 0, job
    assert len({(j["mem_mb"], j["runtime"]) for j in submitted}) > 1  # the check can tell

    # The jobs logged with the credentials from their environment, which no log shows.
    logs = [res.stdout, res.stderr, *(j["log"].read_text() for j in submitted)]
    assert not [text for text in logs if creds["MLFLOW_TRACKING_PASSWORD"] in text]
    for key, value in creds.items():
        monkeypatch.setenv(key, value)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg["name"])
    runs = client.search_runs([exp.experiment_id], f"tags.dag_run = '{dag_run}'",
                              max_results=1000)
    # One run per job, the evaluations excepted: each lands on its trial's training run.
    n_evaluations = sum(j["step"] == "evaluate" for j in plan.all_jobs(cfg))
    assert len(runs) == n_jobs - n_evaluations
    assert all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        if run.info.run_name.startswith("train-policy/"):
            assert client.get_metric_history(run.info.run_id, "normalized_score")
            assert "eval/normalized_score" in run.data.metrics
            assert "metrics.parquet" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_scancelled_job_is_retried_and_resumes(cluster, mlflow_server, tmp_path):
    """scancel of a running training job: Snakemake (profile: retries) resubmits it, the new
    job resumes from the checkpoint, and the result equals an uninterrupted local run's."""
    repo = copy_repo(tmp_path / "repo")
    results = tmp_path / "results"
    task = "hopper-medium-replay"
    target = f"{results}/tiny/policies/td3bc/{task}/seed0/final.json"
    args = ("--configfile", "tests/configs/tiny.yaml", "--config", f"results_dir={results}",
            LONGER_POLICY, "--", target)
    uri, creds = mlflow_server
    env = env_with_bin({"MLFLOW_TRACKING_URI": uri, **creds})
    proc = subprocess.Popen(["snakemake", "--cores", "all", "--profile", "slurm", *args],
                            cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    ckpt = Path(target).parent / "checkpoint.pt"
    deadline = time.monotonic() + 900
    cancelled = None
    while cancelled is None and time.monotonic() < deadline and proc.poll() is None:
        if ckpt.exists():
            for line in subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i|%k"],
                                       capture_output=True, text=True).stdout.splitlines():
                job, comment = line.split("|", 1)
                if comment.startswith("rule_train_policy"):
                    subprocess.run(["scancel", job], check=True)
                    cancelled = job
        time.sleep(0.2)
    output = proc.communicate(timeout=1800)[0]
    assert cancelled, "no running train_policy job with a checkpoint was seen\n" + output[-4000:]
    assert proc.returncode == 0, output[-8000:]
    assert sacct(cancelled)[cancelled]["State"].startswith("CANCELLED")
    assert "Trying to restart job" in output
    retried = [j for j in submitted_jobs(output) if j["rule"] == "train_policy"]
    assert len(retried) == 2 and sacct(retried[-1]["slurm_id"])[retried[-1]["slurm_id"]][
        "State"] == "COMPLETED"
    job_log = (results / "tiny/logs/policies/td3bc" / f"{task}/seed0.log").read_text()
    resumed = re.search(r"resuming \S+ from step (\d+)", job_log)
    assert resumed and int(resumed.group(1)) > 0, job_log[-3000:]

    # The same job, uninterrupted, on this machine (same dataset, no SLURM).
    reference = tmp_path / "reference"
    shutil.copytree(results / "tiny/datasets", reference / "tiny/datasets")
    ref_target = target.replace(str(results), str(reference))
    res = snakemake("--cores", "1", "--configfile", "tests/configs/tiny.yaml", "--config",
                    f"results_dir={reference}", LONGER_POLICY, "--", ref_target, cwd=repo,
                    env={"DYDIFF_MLFLOW": "0"})
    assert res.returncode == 0, tail(res)
    assert_same_training(Path(ref_target).parent, Path(target).parent)
