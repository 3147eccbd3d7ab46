"""MLflow tracking: one run per job, batched metrics, no loss under parallel writers."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness import tracking

mlflow = pytest.importorskip("mlflow")


def _uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_job_run_logs_params_metrics_tags_and_artifacts(tmp_path):
    uri = _uri(tmp_path)
    tracking.init_store(uri, "exp")
    out = tmp_path / "job"
    out.mkdir()
    (out / "final.json").write_text(json.dumps({"normalized_score": 12.5}))
    with tracking.job_run(experiment="exp", run_name="train-policy/td3bc/hopper-medium/seed0",
                          params={"policy": {"offline": {"total_steps": 10}}},
                          tags={"method": "td3bc", "seed": 0}, out_dir=out, uri=uri,
                          artifacts=lambda: [out / "final.json"]) as log_fn:
        for step in range(1200):  # more than one log_batch chunk
            log_fn({"loss": 1.0 / (step + 1)}, step)
    client = mlflow.tracking.MlflowClient(uri)
    run = client.get_run((out / "mlflow_run_id").read_text())
    assert run.info.status == "FINISHED"
    assert run.data.params["policy.offline.total_steps"] == "10"
    assert run.data.tags["method"] == "td3bc"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert len(history) == 1200
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["final.json"]


def test_resumed_job_reuses_its_run(tmp_path):
    uri = _uri(tmp_path)
    tracking.init_store(uri, "exp")
    kwargs = dict(experiment="exp", run_name="r", params={"a": 1}, tags={}, out_dir=tmp_path,
                  uri=uri)
    with pytest.raises(KeyboardInterrupt):
        with tracking.job_run(**kwargs) as log_fn:
            log_fn({"x": 1.0}, 0)
            raise KeyboardInterrupt  # a killed job
    first = (tmp_path / "mlflow_run_id").read_text()
    client = mlflow.tracking.MlflowClient(uri)
    assert client.get_run(first).info.status == "FAILED"
    with tracking.job_run(**kwargs) as log_fn:
        log_fn({"x": 2.0}, 1)
    assert (tmp_path / "mlflow_run_id").read_text() == first
    assert client.get_run(first).info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(first, "x")] == [1.0, 2.0]


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from harness import tracking
    uri, out, index = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    with tracking.job_run(experiment="exp", run_name=f"job{index}", params={"i": index},
                          tags={"job": index}, out_dir=out, uri=uri) as log_fn:
        for step in range(300):
            log_fn({"a": step, "b": -step}, step)
            if step % 50 == 0:
                log_fn.flush()  # many small batches: maximal contention
""")


@pytest.mark.slow
def test_parallel_jobs_on_fresh_store_lose_nothing(tmp_path):
    """8 processes write to one fresh sqlite store (initialised once first, as the DAG does)."""
    uri = _uri(tmp_path)
    tracking.init_store(uri, "exp")
    procs = []
    for i in range(8):
        out = tmp_path / f"job{i}"
        out.mkdir()
        procs.append(subprocess.Popen([sys.executable, "-c", WRITER, uri, str(out), str(i)],
                                      stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name("exp")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    assert len(runs) == 8
    for run in runs:
        assert run.info.status == "FINISHED"
        for key in ("a", "b"):
            assert len(client.get_metric_history(run.info.run_id, key)) == 300


def test_flatten_nested_params():
    assert tracking.flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {
        "a.b": "1", "a.c": "[1, 2]", "d": "None"}
