"""A dataset's verdict and provenance, written next to it (`<task>.data.json`).

The import step (harness.data.sources.import_step) and dataset generation
(datagen.generate.generate_step) write one record per dataset they produce, atomically; the
training runs' MLflow tags (harness.runner), the summary, the tables' captions and the report
read it (analysis). What a reader of the results needs to judge a number and cannot see in it:

- verdict: the dynamics-consistency check's (harness/data/consistency.py): "matches",
  "matches up to release drift", "not checked (no qpos/qvel)", or "wrong model accepted"
  (imported with data.consistency.accept_mismatch: true), with the simulator model chosen and
  its residual;
- origin: "generated" (here, by datagen: each behaviour policy's normalised score, its target
  and whether it reached it), "d4rl" (a file under D4RL's name: the name and its sha256),
  "minari" (the dataset id and its version) or "file" (a user's file, `data.files`: its path
  and sha256);
- notes: how the file was read where that is not plain (a -v0 file's episode ends, a maze's
  derived next observations, relabelled rewards).

Results made before these records existed have none: `read_record` then rebuilds what the
dataset file's attrs say, with origin "unknown".
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import h5py

from harness.checkpoint import atomic_write_text
from harness.data.consistency import ACCEPTED

SUFFIX = ".data.json"
# Verdicts that leave a result resting on data the check did not vouch for.
UNCHECKED_PREFIX = "not checked"


def record_path(dataset_path: str | os.PathLike) -> Path:
    """<task>.data.json next to <task>.hdf5."""
    path = Path(dataset_path)
    return path.with_name(path.stem + SUFFIX)


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check_fields(report: dict) -> dict:
    residual = report.get("residual")
    return {"verdict": report["status"], "sim_model": report["sim_model"],
            "residual": None if residual is None else float(residual),
            "recorded_mujoco": report.get("recorded_mujoco", "unknown"),
            "accept_mismatch": bool(report.get("accept_mismatch", False))}


def imported(task: str, origin: str, source: str, report: dict, dataset) -> dict:
    """The record of an imported dataset: `origin` d4rl / minari / file, `source` the D4RL
    file, Minari id or user path it was read from, `report` the consistency check's."""
    rec = {"task": task, "origin": origin, "source": source, **_check_fields(report),
           "data_return": dataset.summary()["normalized_return_mean"],
           "notes": [f"{k}: {v}" for k, v in sorted(dataset.extra.items())
                     if k in ("timeouts", "next_observations", "rewards")]}
    if origin == "minari":
        rec["minari_version"] = source.rsplit("-", 1)[-1]
    elif Path(dataset.source).exists():
        rec["sha256"] = file_sha256(dataset.source)
    return rec


def _attr(attrs, key, default=None):
    value = attrs.get(key, default)
    value = value.decode() if isinstance(value, bytes) else value
    return value.item() if hasattr(value, "item") else value


def from_file(dataset_path: str | os.PathLike, task: str, origin: str = "unknown") -> dict:
    """The record a dataset file's own attrs give (generation writes them all: the check's
    report, the behaviour policy's score, target and whether it reached it)."""
    with h5py.File(dataset_path, "r") as f:
        attrs = dict(f.attrs)
    report = json.loads(_attr(attrs, "consistency", "{}") or "{}")
    if origin == "unknown" and _attr(attrs, "generator"):
        origin = "generated"
    rec = {"task": task, "origin": origin,
           "source": _attr(attrs, "generator") or _attr(attrs, "source") or str(dataset_path),
           "verdict": _attr(attrs, "consistency_status", report.get("status", "unknown")),
           "sim_model": _attr(attrs, "sim_model", report.get("sim_model")),
           "residual": _attr(attrs, "consistency_residual"),
           "recorded_mujoco": _attr(attrs, "recorded_mujoco", "unknown"),
           "accept_mismatch": bool(report.get("accept_mismatch", False)),
           "data_return": _attr(attrs, "behaviour_normalized_return"), "notes": []}
    if rec["residual"] is not None and rec["residual"] != rec["residual"]:  # NaN: none
        rec["residual"] = None
    if "policy_normalized_score" in attrs:
        rec["behaviour"] = {"policy_normalized_score": _attr(attrs, "policy_normalized_score"),
                            "target_normalized_score": _attr(attrs, "target_normalized_score"),
                            "target_reached": bool(_attr(attrs, "target_reached", False)),
                            "sac_steps": _attr(attrs, "sac_steps")}
    if origin == "generated":
        rec["seed"], rec["git_sha"] = _attr(attrs, "seed"), _attr(attrs, "git_sha")
        if rec["recorded_mujoco"] == "unknown":  # recorded by the software that wrote it
            written_by = json.loads(_attr(attrs, "environment", "{}") or "{}")
            rec["recorded_mujoco"] = (written_by.get("packages") or {}).get("mujoco") \
                or "unknown"
    return rec


def write_record(dataset_path: str | os.PathLike, record: dict) -> Path:
    path = record_path(dataset_path)
    atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")
    return path


def read_record(dataset_path: str | os.PathLike, task: str | None = None) -> dict:
    """The record next to a dataset; for results older than records, the file's attrs'."""
    path = record_path(dataset_path)
    if path.exists():
        return json.loads(path.read_text())
    return from_file(dataset_path, task or Path(dataset_path).stem)


# ---- words (one place, for the summary, the captions and MLflow) ------------------------------

def unchecked(record: dict) -> bool:
    return str(record.get("verdict", "")).startswith(UNCHECKED_PREFIX) or \
        record.get("verdict") == "unknown"


def accepted(record: dict) -> bool:
    return record.get("verdict") == ACCEPTED


def published_data(record: dict) -> bool:
    """Whether the data can be the data published numbers were obtained on: a D4RL file."""
    return record.get("origin") == "d4rl"


def behaviour_text(record: dict) -> str:
    b = record.get("behaviour")
    if not b:
        return ""
    score = f"{b['policy_normalized_score']:.1f}"
    if b.get("target_normalized_score") is None:
        return f"behaviour policy {score}" + ("" if b["target_reached"] else
                                               ", a policy below its target")
    return (f"behaviour policy {score} vs target {b['target_normalized_score']:g}: "
            f"{'reached' if b['target_reached'] else 'missed'}")


def origin_text(record: dict) -> str:
    origin, source = record.get("origin", "unknown"), record.get("source", "")
    digest = f", sha256 {record['sha256'][:12]}" if record.get("sha256") else ""
    if origin == "generated":
        extra = behaviour_text(record) or ("D4RL's waypoint controller"
                                           if source == "datagen.maze2d" else "")
        return "generated here" + (f" ({extra})" if extra else "")
    if origin == "d4rl":
        return f"D4RL file {Path(source).name}{digest}"
    if origin == "minari":
        return f"Minari {source}"
    if origin == "file":
        return f"user file {source}{digest}"
    return f"unknown (no record; file attrs: {source})"


def verdict_text(record: dict) -> str:
    verdict, model = record.get("verdict", "unknown"), record.get("sim_model")
    residual = record.get("residual")
    figures = f"{model}" + (f", residual {residual:.3g}" if residual is not None else "")
    if accepted(record):
        return f"accepted despite a mismatch ({figures}; data.consistency.accept_mismatch)"
    if unchecked(record):
        return f"{verdict}: evaluated in {model}"
    return f"{verdict} ({figures})"


def mlflow_tags(record: dict) -> dict[str, str]:
    tags = {"data.origin": record.get("origin", "unknown"),
            "data.source": str(record.get("source", ""))[:500],
            "data.verdict": str(record.get("verdict", "unknown")),
            "data.sim_model": str(record.get("sim_model"))}
    if record.get("sha256"):
        tags["data.sha256"] = record["sha256"]
    if record.get("behaviour"):
        tags["data.target_reached"] = str(record["behaviour"]["target_reached"])
    return tags
