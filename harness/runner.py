"""Run one job spec: resolve its step in the registry, inside the job's MLflow run.

Every step is `fn(spec, log_fn) -> dict` living with its code (registry.STEPS); it writes into
spec["out"] atomically and resumes from its checkpoints. Its returned numbers are logged as
`final/<key>` metrics, except for a step logged into its trial's row (TRIAL_ROW: the final
evaluation, which logs its own eval/... metrics into the training run). A job reading a dataset
records it as the run's MLflow dataset input.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import h5py

from harness import levers, provenance, registry, runtime, tracking
from harness.data import record
from harness.config import config_hash
from harness.runtime import git_sha

log = logging.getLogger("dydiff")

ARTIFACT_SUFFIXES = (".parquet", ".json", ".png", ".pdf", ".csv")


def run_name(spec: dict) -> str:
    """'train-policy/mopo/hopper-medium-replay/seed0', 'train-model/ensemble/hopper-...'."""
    parts = (spec["step"], spec.get("method") or spec.get("model") or spec.get("family"),
             spec.get("task"), f"seed{spec['seed']}" if "seed" in spec else None)
    return "/".join(str(x) for x in parts if x)


def description(spec: dict) -> str:
    """The run's description in the UI: 'train-policy: mopo on hopper-medium-replay, seed 0
    (config smoke)'."""
    what = spec.get("method") or (f"{spec['model']} model" if spec.get("model") else
                                  spec.get("family"))
    text = spec["step"] + (f": {what}" if what else "")
    text += f" on {spec['task']}" if spec.get("task") else ""
    text += f", seed {spec['seed']}" if "seed" in spec else ""
    return f"{text} (config {spec.get('experiment', '?')})"


def tags(spec: dict) -> dict[str, str]:
    dev = runtime.device_record()
    return {"step": spec["step"], "task": spec.get("task", ""),
            "device": str(runtime.device()), "device.name": dev["name"],
            "device.deterministic": str(dev["deterministic"]), **provenance.mlflow_tags(),
            **{f"levers.{k}": str(v) for k, v in levers.record().items()},
            "method": spec.get("method") or spec.get("model") or spec["step"],
            "seed": str(spec.get("seed", spec.get("config", {}).get("seed", ""))),
            "git_sha": git_sha(), "config_hash": config_hash(spec.get("config", {})),
            "dag_run": os.environ.get("DYDIFF_DAG_RUN", "manual"),
            "mlflow.note.content": description(spec)}


# A step logged into the row of another job of its trial (TRIAL_ROW[step] = that job's step):
# the final evaluation lands on its training run, so one row holds the training curve and the
# final score. Its metrics are the step's own (eval/...), logged by the step.
TRIAL_ROW = {"evaluate": "train-policy"}


def _dataset_input(spec: dict, log_fn) -> None:
    """The job's dataset as the run's MLflow dataset input: task name, file, content digest."""
    path = Path(spec["dataset"])
    if not path.exists():  # a job's own step reports the missing input, with its name
        return
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()[:16]  # MLflow: at most 36 chars
    with h5py.File(path, "r") as f:
        rows = int(f["rewards"].shape[0]) if "rewards" in f else None
    tracking.log_dataset(log_fn, name=spec.get("task") or path.stem, source=str(path.resolve()),
                         digest=digest, profile={"num_rows": rows} if rows else None,
                         context="training" if spec["step"].startswith("train") else spec["step"])
    # The data's verdict and origin on every run that used it (harness/data/record.py).
    for key, value in record.mlflow_tags(record.read_record(path, spec.get("task"))).items():
        tracking.retry(log_fn.client.set_tag, log_fn.run_id, key, value)


def run_job(spec: dict) -> dict:
    """Run one job spec under its MLflow run (unless DYDIFF_MLFLOW=0)."""
    if spec["step"] not in registry.STEPS:
        raise KeyError(f"unknown step {spec['step']!r}; known: {list(registry.STEPS)}")
    fn = registry.resolve(registry.STEPS[spec["step"]])
    # The job's device (harness.plan.job_device), or it stops here with one line.
    runtime.use_device(spec.get("device", "cpu"), spec.get("deterministic", True),
                       where=f"{spec['step']} device")
    levers.use_levers(spec.get("levers"), where=f"{spec['step']} levers")  # the defaults if none
    out = Path(spec["out"])
    # A step writing one file (import-dataset -> <task>.hdf5) shares its folder with other
    # jobs' runs: its own run id sits next to its file.
    out_dir = out.parent if out.suffix else out
    id_name = f"{out.stem}.mlflow_run_id" if out.suffix else "mlflow_run_id"
    start = time.time()
    if os.environ.get("DYDIFF_MLFLOW", "1") == "0":
        result = fn(spec, None)
    elif spec["step"] in TRIAL_ROW:
        trial = {**spec, "step": TRIAL_ROW[spec["step"]]}
        own = tags(spec)
        with tracking.trial_run(
                experiment=spec["experiment"], run_name=run_name(trial),
                tags={f"{spec['step']}_{k}": own[k] for k in ("git_sha", "config_hash", "dag_run")},
                new_run_tags=tags(trial), id_file=Path(spec["policy_dir"]) / "mlflow_run_id",
                uri=tracking.default_uri(spec.get("results_dir", "results")),
                artifacts=lambda: [out]) as log_fn:
            result = fn(spec, log_fn)
    else:
        def artifacts() -> list[Path]:
            return [out] if out.suffix else sorted(p for p in out_dir.glob("*")
                                                   if p.suffix in ARTIFACT_SUFFIXES)
        with tracking.job_run(experiment=spec["experiment"], run_name=run_name(spec),
                              params=spec.get("config", {}), tags=tags(spec), out_dir=out_dir,
                              uri=tracking.default_uri(spec.get("results_dir", "results")),
                              id_name=id_name, artifacts=artifacts) as log_fn:
            if spec.get("dataset"):
                _dataset_input(spec, log_fn)
            result = fn(spec, log_fn)
            finals = {f"final/{k}": v for k, v in (result or {}).items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)}
            log_fn(finals, int(result.get("steps", 0)) if result else 0)
            for key, value in ((result or {}).get("tags") or {}).items():  # known after the run
                tracking.retry(log_fn.client.set_tag, log_fn.run_id, key, str(value))
    log.info("%s finished in %.1f s", run_name(spec), time.time() - start)
    return result
