"""16 jobs logging at once lose nothing: each a process that logs a run through the DAG's own
path (tracking.job_run: params, 1,000 metric points via the batched log_fn, one artefact,
retries), all released together, into a freshly created sqlite store and into an
authenticated MLflow server (the README's cluster recipe). Prints the wall time (pytest -s).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import time
import traceback
from pathlib import Path
from urllib.parse import urlparse

import pytest

import mlflow_server
from harness import tracking

mlflow = pytest.importorskip("mlflow")
pytestmark = pytest.mark.slow

WRITERS, POINTS = 16, 1000
# Each writer is its own process, forked from a clean forkserver process (never from pytest)
# that imported the harness and MLflow once: 16 cold imports of torch + MLflow would cost
# minutes of CPU on a 2-core machine and measure the imports, not the writes.
PRELOAD = ["harness.tracking", "harness.checkpoint", "mlflow.entities", "mlflow.tracking",
           "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.tracking.rest_store"]


@pytest.fixture(autouse=True)
def no_telemetry(monkeypatch):
    """No MLflow telemetry threads (network) in the forkserver that the writers fork from."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


def writer(uri: str, out: Path, index: int, env: dict, start) -> None:
    """One DAG job's logging: job_run (params, tags, batched metrics, artefact, retries)."""
    try:
        os.environ.update(env)  # credentials, as a SLURM job gets them
        (out / "result.json").write_text(json.dumps({"job": index}))
        start.wait()  # all writers are ready: release them together
        with tracking.job_run(experiment="exp", run_name=f"job{index}",
                              params={"job": index, "policy": {"lr": 1e-3 * (index + 1)}},
                              tags={"job": index}, out_dir=out, uri=uri,
                              artifacts=lambda: [out / "result.json"]) as log_fn:
            for step in range(POINTS):
                log_fn({"x": index * POINTS + step}, step)
    except BaseException:
        (out / "error.txt").write_text(traceback.format_exc())
        raise


def run_writers(uri: str, root: Path, env: dict | None = None) -> tuple[float, float]:
    """Run WRITERS processes released together; return (seconds from the release to the last
    exit, seconds including the processes' start)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    start = ctx.Barrier(WRITERS + 1)
    t0 = time.monotonic()
    procs = []
    for i in range(WRITERS):
        (root / f"job{i}").mkdir(parents=True)
        procs.append(ctx.Process(target=writer, args=(uri, root / f"job{i}", i, env or {},
                                                      start)))
        procs[-1].start()
    start.wait(timeout=300)  # a writer that died first breaks the barrier
    released = time.monotonic()
    for p in procs:
        p.join(timeout=600)
    end = time.monotonic()
    errors = [e.read_text() for e in root.glob("job*/error.txt")]
    assert all(p.exitcode == 0 for p in procs) and not errors, "\n".join(errors)[-6000:]
    return end - released, end - t0


def assert_nothing_lost(uri: str, root: Path, label: str, times: tuple[float, float],
                        artifact_dir) -> None:
    """Every run, param, tag, metric point (value and step) and artefact is in the store.
    artifact_dir(run): where the store keeps the run's artefacts on disk."""
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name("exp")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    points = artefacts = 0
    for run in runs:
        i = int(run.data.params["job"])
        assert run.info.run_id == (root / f"job{i}" / "mlflow_run_id").read_text()
        assert run.info.status == "FINISHED" and run.info.run_name == f"job{i}"
        assert run.data.params["policy.lr"] == str(1e-3 * (i + 1))
        assert run.data.tags["job"] == str(i)
        history = sorted((m.step, m.value)
                         for m in client.get_metric_history(run.info.run_id, "x"))
        assert history == [(s, float(i * POINTS + s)) for s in range(POINTS)], label
        points += len(history)
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["result.json"]
        stored = artifact_dir(run) / "result.json"
        assert json.loads(stored.read_text()) == {"job": i}
        artefacts += 1
    assert sorted(int(r.data.params["job"]) for r in runs) == list(range(WRITERS))
    print(f"\n{label}: {len(runs)}/{WRITERS} runs, {points}/{WRITERS * POINTS} metric points, "
          f"{artefacts}/{WRITERS} artefacts; {times[0]:.1f} s from the start signal to the "
          f"last writer's exit ({times[1]:.1f} s with the processes' start)")


def test_concurrent_writers_sqlite_lose_nothing(tmp_path):
    """A fresh sqlite store, created once by init_store as the DAG does before its jobs."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.init_store(uri)
    # Artefacts under tmp_path (the default location is ./mlruns of the working directory).
    mlflow.tracking.MlflowClient(uri).create_experiment(
        "exp", artifact_location=(tmp_path / "artifacts").as_uri())
    times = run_writers(uri, tmp_path / "jobs")
    assert_nothing_lost(uri, tmp_path / "jobs", "sqlite", times,
                        lambda run: Path(urlparse(run.info.artifact_uri).path))


def test_concurrent_writers_server_lose_nothing(tmp_path, monkeypatch):
    """The authenticated server; every writer logs as one job user with credentials from its
    environment (what sbatch --export=ALL gives a SLURM job)."""
    server = mlflow_server.start(tmp_path / "server")
    try:
        creds = server.create_user("dydiff-jobs")
        for key, value in creds.items():
            monkeypatch.setenv(key, value)
        tracking.init_store(server.uri, "exp")
        times = run_writers(server.uri, tmp_path / "jobs", env=creds)
        # The server proxies artefacts: mlflow-artifacts:/<exp>/<run>/artifacts is stored under
        # its --artifacts-destination.
        assert_nothing_lost(server.uri, tmp_path / "jobs", "MLflow server (basic-auth)", times,
                            lambda run: server.root / "artifacts" /
                            run.info.artifact_uri.split(":/", 1)[1])
    finally:
        server.stop()
