"""The one MLflow entry point: store set-up, run naming, tags, batched logging with retries.

Default store: an embedded sqlite DB under results/ (`sqlite:///results/mlflow.db`), created
once by `init_store` before parallel jobs start (several processes creating a fresh sqlite store
at once crash in MLflow's schema migration). `MLFLOW_TRACKING_URI` points every job at a server
instead (on a cluster an authenticated `mlflow server --app-name basic-auth`, README: Cluster;
clients read MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD from the environment).
Metrics are buffered and sent with `log_batch` (per-metric calls under contention cost seconds
each); sqlite lock errors are retried, a server's refusal (401/403) is not.
"""
from __future__ import annotations

import logging
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from harness.checkpoint import atomic_write_text

log = logging.getLogger(__name__)

MAX_METRICS_PER_BATCH = 1000   # MLflow's log_batch limits
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000


def default_uri(results_dir: str | os.PathLike = "results") -> str:
    """`MLFLOW_TRACKING_URI` if set, else the sqlite store under `results_dir`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(results_dir) / 'mlflow.db'}"


def _client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


class TrackingAuthError(RuntimeError):
    """The tracking server refused the credentials (HTTP 401) or the user's rights (403)."""


def _refused_status(err: Exception) -> int | None:
    """401/403 from an authenticated MLflow server (never transient: retrying cannot help)."""
    status = getattr(err, "get_http_status_code", lambda: None)()
    if status in (401, 403):
        return status
    text = str(err)  # older MLflow reports a non-JSON 401 body only in the message
    return next((code for code in (401, 403) if f"error code {code}" in text), None)


def _auth_error(status: int) -> TrackingAuthError:
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if status == 401:
        why = ("no credentials: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
               if not user else f"unknown MLFLOW_TRACKING_USERNAME={user} or wrong "
               "MLFLOW_TRACKING_PASSWORD")
    else:
        why = (f"MLFLOW_TRACKING_USERNAME={user or '(unset)'} may not write to this "
               "experiment: grant it EDIT, or use the user that created the experiment")
    return TrackingAuthError(f"MLflow server refused the request (HTTP {status}): {why} "
                             "(README: Cluster)")


def retry(fn: Callable, *args, attempts: int = 12, **kwargs):
    """Call fn, retrying transient store errors (sqlite 'database is locked', HTTP 5xx);
    a server's 401/403 fails at once with a TrackingAuthError naming the credentials."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # mlflow wraps sqlalchemy/requests errors in several types
            status = _refused_status(err)
            if status:
                raise _auth_error(status) from err
            text = str(err).lower()
            transient = any(s in text for s in ("locked", "busy", "timeout", "temporarily",
                                                 "connection", "503", "502", "unique constraint"))
            if not transient or attempt == attempts - 1:
                raise
            time.sleep(min(5.0, 0.1 * 2 ** attempt) * (0.5 + random.random()))


def init_store(uri: str | None = None, experiment: str | None = None) -> str:
    """Create the store (runs MLflow's DB migrations once) and the experiment; return its id."""
    uri = uri or default_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    client = _client(uri)
    if experiment is None:
        retry(client.search_experiments, max_results=1)
        return ""
    return get_or_create_experiment(client, experiment)


def init_experiment(cfg: dict) -> str:
    """Create the store and the config's experiment (unless DYDIFF_MLFLOW=0); return the URI."""
    uri = default_uri(cfg.get("results_dir", "results"))
    if os.environ.get("DYDIFF_MLFLOW", "1") != "0":
        init_store(uri, cfg["name"])
    return uri


def get_or_create_experiment(client, name: str) -> str:
    exp = retry(client.get_experiment_by_name, name)
    if exp is not None:
        return exp.experiment_id
    try:
        return retry(client.create_experiment, name)
    except Exception:  # another job created it first
        return retry(client.get_experiment_by_name, name).experiment_id


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'} for MLflow params."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
    else:
        out[prefix.rstrip(".")] = str(data)[:MAX_PARAM_LENGTH]
    return out


class BatchedLogger:
    """Buffers metrics and sends them in batches; callable as `log_fn(metrics, step)`."""

    def __init__(self, client, run_id: str, flush_every: int = 500):
        self.client, self.run_id, self.flush_every = client, run_id, flush_every
        self.buffer: list = []

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if value is None:
                continue
            value = float(value)
            if value != value or value in (float("inf"), float("-inf")):  # MLflow rejects them
                continue
            self.buffer.append(Metric(key, value, now, int(step)))
        if len(self.buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        while self.buffer:
            chunk = self.buffer[:MAX_METRICS_PER_BATCH]
            retry(self.client.log_batch, self.run_id, metrics=chunk)
            self.buffer = self.buffer[MAX_METRICS_PER_BATCH:]


@contextmanager
def job_run(*, experiment: str, run_name: str, params: dict, tags: dict[str, str],
            out_dir: str | os.PathLike, uri: str | None = None, id_name: str = "mlflow_run_id",
            artifacts: Callable[[], list[Path]] | None = None) -> Iterator[BatchedLogger]:
    """One MLflow run per job. Yields the batched `log_fn`.

    The run id is kept in out_dir/<id_name>, so a job resumed after a kill keeps logging into
    the same run. On success the run is FINISHED and `artifacts()` files are uploaded; on error
    it is marked FAILED (a later resume re-opens it).
    """
    from mlflow.entities import Param, RunTag

    uri = uri or default_uri()
    client = _client(uri)
    exp_id = get_or_create_experiment(client, experiment)
    id_file = Path(out_dir) / id_name
    run_id = id_file.read_text().strip() if id_file.exists() else None
    if run_id:
        try:
            retry(client.get_run, run_id)
            retry(client.update_run, run_id, status="RUNNING")
        except TrackingAuthError:
            raise
        except Exception:
            run_id = None  # the store was reset: start a new run
    if not run_id:
        run = retry(client.create_run, exp_id, run_name=run_name,
                    tags={k: str(v) for k, v in tags.items()})
        run_id = run.info.run_id
        atomic_write_text(id_file, run_id)
        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            retry(client.log_batch, run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])
    else:
        retry(client.log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    logger = BatchedLogger(client, run_id)
    try:
        yield logger
    except BaseException:
        logger.flush()
        retry(client.set_terminated, run_id, status="FAILED")
        raise
    logger.flush()
    for path in (artifacts() if artifacts else []):
        if Path(path).exists():
            retry(client.log_artifact, run_id, str(path))
    retry(client.set_terminated, run_id, status="FINISHED")


@contextmanager
def trial_run(*, experiment: str, run_name: str, tags: dict[str, str], id_file: Path,
              new_run_tags: dict[str, str], uri: str | None = None,
              artifacts: Callable[[], list[Path]] | None = None) -> Iterator[BatchedLogger]:
    """Log into the run another job of the same trial keeps the id of in `id_file` (the final
    evaluation into its training run: one row per trial in the MLflow UI). Yields the batched
    `log_fn`.

    That run's status, params and tags stay as they are; only `tags` are set, after the body
    succeeded (a failure logs nothing). Re-logging a metric makes the new value the run's
    latest, which the UI and search show. Without that run (its job ran with DYDIFF_MLFLOW=0,
    or the store was reset) one is created with `run_name` and `new_run_tags`."""
    from mlflow.entities import RunTag

    uri = uri or default_uri()
    client = _client(uri)
    run_id = id_file.read_text().strip() if id_file.exists() else None
    if run_id:
        try:
            retry(client.get_run, run_id)
        except TrackingAuthError:
            raise
        except Exception:
            run_id = None
    created = not run_id
    if created:
        exp_id = get_or_create_experiment(client, experiment)
        run_id = retry(client.create_run, exp_id, run_name=run_name,
                       tags={k: str(v) for k, v in new_run_tags.items()}).info.run_id
        atomic_write_text(id_file, run_id)
    logger = BatchedLogger(client, run_id)
    yield logger
    logger.flush()
    retry(client.log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    for path in (artifacts() if artifacts else []):
        if Path(path).exists():
            retry(client.log_artifact, run_id, str(path))
    if created:
        retry(client.set_terminated, run_id, status="FINISHED")


def log_dataset(logger: BatchedLogger, *, name: str, source: str, digest: str,
                context: str = "training", profile: dict | None = None) -> None:
    """Record the dataset a run used as an MLflow dataset input (the UI's Dataset column;
    search `datasets.name`, `datasets.digest`): metadata only, never its rows. Logging the
    same (name, digest) again, as a resumed job does, adds nothing."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag
    entity = Dataset(name=name, digest=digest, source_type="local",
                     source=json.dumps({"uri": source}),
                     profile=json.dumps(profile) if profile else None)
    retry(logger.client.log_inputs, logger.run_id,
          datasets=[DatasetInput(entity, [InputTag("mlflow.data.context", context)])])
