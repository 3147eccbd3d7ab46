"""Helpers shared by the DAG tests (test_workflow.py, test_slurm.py): run Snakemake from this
environment, read a training job's outputs, compare two runs of the same job."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
# A longer td3bc job for the resume tests: long enough to be interrupted after a checkpoint.
LONGER_POLICY = ("policy={'offline': {'total_steps': 3000, 'checkpoint_every': 250, "
                 "'eval_every': 1000}}")


def env_with_bin(extra: dict | None = None) -> dict:
    """This environment with the venv's bin first on PATH (snakemake, dydiff-bench)."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(extra or {})}


def snakemake(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 1200):
    return subprocess.run([str(BIN / "snakemake"), *args], cwd=cwd, env=env_with_bin(env),
                          capture_output=True, text=True, timeout=timeout)


def tail(res, n: int = 4000) -> str:
    return (res.stdout + res.stderr)[-n:]


def copy_repo(dst: Path) -> Path:
    """The project's files (no venv, results or caches) in dst: a repository root of its own,
    for tests that must run Snakemake exactly as a user does from the root."""
    skip = shutil.ignore_patterns(".git", ".venv", "results", ".snakemake", "mlruns",
                                  "__pycache__", ".pytest_cache", ".benchmarks", "*.egg-info")
    shutil.copytree(ROOT, dst, symlinks=True, ignore=skip)
    (dst / "results").mkdir()
    return dst


def training_outputs(out_dir: Path):
    """(metrics without wall time, policy weights, final.json) of a train-policy job."""
    import pandas as pd
    import torch
    return (pd.read_parquet(out_dir / "metrics.parquet").drop(columns="wall_time_s"),
            torch.load(out_dir / "policy.pt", weights_only=True)["state_dict"],
            json.loads((out_dir / "final.json").read_text()))


def assert_same_training(reference: Path, other: Path) -> None:
    """Two runs of one job (e.g. uninterrupted vs interrupted and resumed) ended identically."""
    import pandas as pd
    import torch
    (m_ref, w_ref, f_ref), (m_other, w_other, f_other) = \
        training_outputs(reference), training_outputs(other)
    pd.testing.assert_frame_equal(m_ref, m_other)
    assert w_ref.keys() == w_other.keys()
    assert all(torch.equal(w_ref[k], w_other[k]) for k in w_ref)
    assert f_ref["normalized_score"] == f_other["normalized_score"]
