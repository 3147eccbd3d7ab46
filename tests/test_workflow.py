"""The Snakemake DAG: dry-run job counts, schema rejection, a tiny real run, MLflow, resume."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dydiff import jobs

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY = ROOT / "tests" / "configs" / "tiny.yaml"


def snakemake(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 1200):
    cmd = [str(BIN / "snakemake"), *args]
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def job_counts(output: str) -> dict[str, int]:
    """Parse snakemake's 'Job stats' table into {rule: count}."""
    counts = {}
    block = output.split("Job stats:")[-1]
    for line in block.splitlines():
        m = re.match(r"^(\w+)\s+(\d+)\s*$", line.strip())
        if m and m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    return counts


@pytest.mark.parametrize("configfile", ["config/smoke.yaml", "config/paper.yaml"])
def test_dry_run_job_counts(configfile, tmp_path):
    cfg = jobs.load_config(ROOT / configfile)
    res = snakemake("-n", "--cores", "1", "--configfile", configfile,
                    "--config", f"results_dir={tmp_path}")
    assert res.returncode == 0, res.stderr + res.stdout
    counts = job_counts(res.stdout)
    n_policy = len(cfg["tasks"]) * len(cfg["methods"]) * len(cfg["seeds"])
    assert counts["train_policy"] == n_policy
    assert counts["evaluate"] == n_policy
    assert counts["train_model"] == len(cfg["tasks"]) * len(jobs.needed_models(cfg))
    assert counts["analyze"] == 1
    if jobs.rollout_error_enabled(cfg):
        assert counts["rollout_error"] == len(cfg["tasks"])
    if jobs.data_source(cfg) == "local":
        assert sum(v for k, v in counts.items() if k.startswith("generate_")) == \
            len(jobs.families(cfg))
    else:
        assert counts["import_dataset"] == len(cfg["tasks"])


def test_command_line_override_changes_the_grid(tmp_path):
    res = snakemake("-n", "--cores", "1", "--config", "seeds=[0,1,2]",
                    f"results_dir={tmp_path}")
    assert res.returncode == 0, res.stderr
    cfg = jobs.load_config(ROOT / "config/smoke.yaml")
    assert job_counts(res.stdout)["train_policy"] == 3 * len(cfg["tasks"]) * len(cfg["methods"])


@pytest.mark.parametrize("override, message", [
    ("methods=[td3bc,dreamer]", "dreamer"),
    ("seeds=[-3]", "seeds"),
    ("tasks=[ant-medium]", "ant-medium"),
    ("policy={'offline':{'total_step':5}}", "total_step"),
])
def test_bad_config_stops_before_any_job(override, message, tmp_path):
    res = snakemake("-n", "--cores", "1", "--config", override, f"results_dir={tmp_path}")
    assert res.returncode != 0
    assert message in res.stderr + res.stdout
    assert not any(tmp_path.iterdir())  # nothing was run or written
