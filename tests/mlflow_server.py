"""An `mlflow server` for tests (test_tracking_*.py, test_slurm.py), set up as the README's
cluster recipe: MLflow's basic-auth app, bound to one interface (here 127.0.0.1, a free port),
sqlite backend and artefact root in a folder of the test's.

Secrets never reach a command line (world-readable in /proc/<pid>/cmdline) or a log: the admin
password is in the auth config file (mode 0600) that MLFLOW_AUTH_CONFIG_PATH names, the CSRF key
in the server's environment, client credentials in MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD.
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from dag_helpers import BIN, env_with_bin

ADMIN = "admin"
# Without MLflow's credential cache every request re-hashes the password on the server: 16
# writers took 51 s instead of 5 s here (README: Cluster).
AUTH_CACHE_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_password() -> str:
    return secrets.token_urlsafe(18)  # 24 characters; MLflow asks for at least 12


def write_private(path: Path, text: str) -> None:
    """Create path readable by its owner only (mode 0600 from the start, not chmod after)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


@dataclass
class Server:
    uri: str
    proc: subprocess.Popen
    root: Path
    admin_password: str | None
    secrets: list[str] = field(default_factory=list)  # must appear in no log or command line

    @property
    def log(self) -> str:
        return (self.root / "server.log").read_text(errors="replace")

    def create_user(self, username: str) -> dict[str, str]:
        """A new (non-admin) user; returns the environment a job needs to log as it."""
        password = new_password()
        self.secrets.append(password)
        r = requests.post(f"{self.uri}/api/2.0/mlflow/users/create",
                          json={"username": username, "password": password},
                          auth=(ADMIN, self.admin_password), timeout=30)
        assert r.status_code == 200, (r.status_code, r.text[:500])
        return {"MLFLOW_TRACKING_USERNAME": username, "MLFLOW_TRACKING_PASSWORD": password}

    def stop(self) -> None:
        """Stop the server and its workers (its own process group, started by start())."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


def start(root: Path, *, auth: bool = True, workers: int = 2, timeout: float = 240) -> Server:
    """Start `mlflow server` with stores under root and wait until /health answers."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in env_with_bin().items()
           if not k.startswith(("MLFLOW_TRACKING_", "MLFLOW_AUTH_"))}
    # The server's job runner (7 background workers, for GenAI jobs the harness never uses)
    # only slows the start on a small machine.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    args = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts"), "--workers", str(workers)]
    admin_password, hidden = None, []
    if auth:
        admin_password, key = new_password(), secrets.token_hex(16)
        hidden = [admin_password, key]
        config = root / "basic_auth.ini"
        write_private(config, "[mlflow]\ndefault_permission = READ\n"
                      f"database_uri = sqlite:///{root / 'basic_auth.db'}\n"
                      f"admin_username = {ADMIN}\nadmin_password = {admin_password}\n"
                      "authorization_function = "
                      "mlflow.server.auth:authenticate_request_basic_auth\n"
                      f"auth_cache_ttl_seconds = {AUTH_CACHE_S}\n")
        env.update(MLFLOW_AUTH_CONFIG_PATH=str(config), MLFLOW_FLASK_SERVER_SECRET_KEY=key)
        args += ["--app-name", "basic-auth"]
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    log.close()
    server = Server(f"http://127.0.0.1:{port}", proc, root, admin_password, hidden)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(f"{server.uri}/health", timeout=5).status_code == 200:
                return server
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise AssertionError("mlflow server did not start:\n" + server.log[-3000:])
        time.sleep(0.5)
