"""Run one job spec: resolve its step in the registry, inside the job's MLflow run.

Every step is `fn(spec, log_fn) -> dict` living with its code (registry.STEPS); it writes into
spec["out"] atomically and resumes from its checkpoints. Its returned numbers are logged as
`final/<key>` metrics.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from harness import registry, tracking
from harness.config import config_hash
from harness.runtime import git_sha

log = logging.getLogger("dydiff")

ARTIFACT_SUFFIXES = (".parquet", ".json", ".png", ".pdf", ".csv")


def run_name(spec: dict) -> str:
    """'train-policy/mopo/hopper-medium-replay/seed0', 'train-model/ensemble/hopper-...'."""
    parts = (spec["step"], spec.get("method") or spec.get("model") or spec.get("family"),
             spec.get("task"), f"seed{spec['seed']}" if "seed" in spec else None)
    return "/".join(str(x) for x in parts if x)


def tags(spec: dict) -> dict[str, str]:
    return {"step": spec["step"], "task": spec.get("task", ""),
            "method": spec.get("method") or spec.get("model") or spec["step"],
            "seed": str(spec.get("seed", spec.get("config", {}).get("seed", ""))),
            "git_sha": git_sha(), "config_hash": config_hash(spec.get("config", {})),
            "dag_run": os.environ.get("DYDIFF_DAG_RUN", "manual")}


def run_job(spec: dict) -> dict:
    """Run one job spec under its MLflow run (unless DYDIFF_MLFLOW=0)."""
    if spec["step"] not in registry.STEPS:
        raise KeyError(f"unknown step {spec['step']!r}; known: {list(registry.STEPS)}")
    fn = registry.resolve(registry.STEPS[spec["step"]])
    out = Path(spec["out"])
    # A step writing one file (evaluate -> eval.json) shares its folder with another job's run:
    # its own run id sits next to its file.
    out_dir = out.parent if out.suffix else out
    id_name = f"{out.stem}.mlflow_run_id" if out.suffix else "mlflow_run_id"
    start = time.time()
    if os.environ.get("DYDIFF_MLFLOW", "1") == "0":
        result = fn(spec, None)
    else:
        def artifacts() -> list[Path]:
            return [out] if out.suffix else sorted(p for p in out_dir.glob("*")
                                                   if p.suffix in ARTIFACT_SUFFIXES)
        with tracking.job_run(experiment=spec["experiment"], run_name=run_name(spec),
                              params=spec.get("config", {}), tags=tags(spec), out_dir=out_dir,
                              uri=tracking.default_uri(spec.get("results_dir", "results")),
                              id_name=id_name, artifacts=artifacts) as log_fn:
            result = fn(spec, log_fn)
            finals = {f"final/{k}": v for k, v in (result or {}).items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)}
            log_fn(finals, int(result.get("steps", 0)) if result else 0)
    log.info("%s finished in %.1f s", run_name(spec), time.time() - start)
    return result
