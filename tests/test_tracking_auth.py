"""The authenticated tracking server of the cluster recipe (MLflow's basic-auth app on one
interface): a client without credentials is refused with 401, a job with credentials from its
environment logs its run through tracking.job_run, refusals fail fast with a message naming
MLFLOW_TRACKING_USERNAME, and no secret shows in a process's arguments or a log.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import requests

import mlflow_server
from dag_helpers import env_with_bin
from harness import tracking

mlflow = pytest.importorskip("mlflow")  # the basic-auth app also needs mlflow[auth] (make install)

JOB = textwrap.dedent("""
    import logging, sys
    from pathlib import Path
    from harness import tracking
    logging.basicConfig(level=logging.DEBUG)  # the most a job's log could show
    uri, out = sys.argv[1], Path(sys.argv[2])
    (out / "final.json").write_text('{"score": 1.0}')
    with tracking.job_run(experiment="auth", run_name="job", params={"seed": 0},
                          tags={"method": "td3bc"}, out_dir=out, uri=uri,
                          artifacts=lambda: [out / "final.json"]) as log_fn:
        for step in range(10):
            log_fn({"loss": 1.0 / (step + 1)}, step)
""")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = mlflow_server.start(tmp_path_factory.mktemp("auth-server"))
    yield srv
    srv.stop()


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    """Neither the environment nor ~/.mlflow/credentials gives this process credentials."""
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))


def session_commands(pid: int) -> list[str]:
    """The command lines of every process in the session pid leads (the server's workers)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == pid:  # field 6 of stat: the session id
                out.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
    return out


def test_unauthenticated_client_is_refused(server, no_credentials):
    search = f"{server.uri}/api/2.0/mlflow/experiments/search"
    r = requests.post(search, json={"max_results": 1}, timeout=30)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Basic")
    r = requests.post(search, json={"max_results": 1}, timeout=30,
                      auth=(mlflow_server.ADMIN, "not-the-password"))
    assert r.status_code == 401
    # The harness fails at once (no retries: they would take ~40 s) and says what to set.
    start = time.monotonic()
    with pytest.raises(tracking.TrackingAuthError,
                       match=r"HTTP 401\): no credentials: set MLFLOW_TRACKING_USERNAME"):
        tracking.init_store(server.uri, "auth")
    assert time.monotonic() - start < 10


def test_wrong_password_and_missing_permission_fail_fast(server, no_credentials, monkeypatch,
                                                         tmp_path):
    owner = server.create_user("owner")
    other = server.create_user("other")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "owner")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password-123")
    with pytest.raises(tracking.TrackingAuthError,
                       match="HTTP 401.*MLFLOW_TRACKING_USERNAME=owner.*MLFLOW_TRACKING_PASSWORD"):
        tracking.init_store(server.uri, "owned")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", owner["MLFLOW_TRACKING_PASSWORD"])
    tracking.init_store(server.uri, "owned")  # the creator may write to it (MANAGE) ...
    for key, value in other.items():          # ... another user only read (default READ)
        monkeypatch.setenv(key, value)
    with pytest.raises(tracking.TrackingAuthError,
                       match="HTTP 403.*MLFLOW_TRACKING_USERNAME=other may not write"):
        with tracking.job_run(experiment="owned", run_name="r", params={}, tags={},
                              out_dir=tmp_path, uri=server.uri):
            pass


def test_job_logs_with_credentials_from_its_environment(server, no_credentials, monkeypatch,
                                                        tmp_path):
    creds = server.create_user("dydiff-jobs")
    out = tmp_path / "job"
    out.mkdir()
    job = subprocess.run([sys.executable, "-c", JOB, server.uri, str(out)], cwd=tmp_path,
                         env=env_with_bin({**creds, "HOME": str(tmp_path)}),
                         capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stderr[-4000:]

    for key, value in creds.items():
        monkeypatch.setenv(key, value)
    client = mlflow.tracking.MlflowClient(server.uri)
    run = client.get_run((out / "mlflow_run_id").read_text())
    assert run.info.status == "FINISHED" and run.data.params == {"seed": "0"}
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 10
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["final.json"]

    # No secret in any log or command line (cmdline is world-readable; the environment and the
    # 0600 config file are not).
    commands = session_commands(server.proc.pid)
    assert any("--app-name basic-auth" in c for c in commands)
    assert len(commands) > 1  # the server and its workers
    secrets = [*server.secrets, creds["MLFLOW_TRACKING_PASSWORD"]]
    for text in [*commands, server.log, job.stdout, job.stderr]:
        assert not [s for s in secrets if s in text]
    assert "DEBUG" in job.stderr and "Authorization" not in job.stderr
    assert (server.root / "basic_auth.ini").stat().st_mode & 0o077 == 0
