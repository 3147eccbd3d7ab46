"""Pricing: the throughput table (measured seconds per unit, analysis/throughput.csv), each
job's resources, and a plan's jobs priced from the table (`JobCost`).
"""
from __future__ import annotations

import csv
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from analysis.work_items import Item, job_items, settings_key
from harness import plan
from harness.config import ConfigError

THROUGHPUT_FILE = Path(__file__).resolve().parent / "throughput.csv"  # package data
COLUMNS = ("item", "key", "seconds", "unit", "device", "threads", "machine", "date", "command",
           "settings")


# ---- resources of a job (the Snakefile's rules read the same config keys) --------------------

RULE_OF_STEP = {"generate-datasets": "generate_datasets", "import-dataset": "import_dataset",
                "train-model": "train_model", "train-policy": "train_policy",
                "evaluate": "evaluate", "rollout-error": "rollout_error", "analyze": "analyze"}


def job_resources(cfg: dict, spec: dict) -> tuple[int, bool]:
    """(threads, runs on a GPU) of a job: threads from `resources:` as workflow/rules/*.smk
    read them, the device the plan gave the job (harness.plan.job_device)."""
    res = cfg.get("resources") or {}
    kind = {"train-model": spec.get("model"), "train-policy": "policy",
            "rollout-error": "rollout_error"}.get(spec["step"])
    gpu = str(spec.get("device", "cpu")).startswith("cuda")
    if kind is None:
        return 1, gpu
    threads = (res.get(kind) or {}).get("threads", 1) if spec["step"] != "rollout-error" else 1
    return int(threads), gpu


# ---- the throughput table --------------------------------------------------------------------

def machine(device: str = "cpu") -> str:
    """'x86_64, 2 CPUs, <CPU model>' (no host names); a GPU row adds the GPU's name, torch's
    version and the CUDA it was built for (what a GPU timing depends on)."""
    if device != "cpu":
        import torch
        return (f"{machine()}, {torch.cuda.get_device_name(torch.device(device))}, "
                f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {model}".rstrip(", ")


def read_table(path: Path = THROUGHPUT_FILE) -> list[dict]:
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(row for row in f if not row.startswith("#")))
    for row in rows:
        try:
            row["seconds"], row["threads"] = float(row["seconds"]), int(row["threads"])
            # The key is recomputed from the row's settings: a setting declared cost-free
            # later (COST_FREE) leaves the rows measured before it findable.
            row["key"] = settings_key(json.loads(row["settings"]))
        except (KeyError, ValueError) as err:
            raise ConfigError(f"{path}: bad row {row}: {err}") from None
    return rows


def write_table(rows: list[dict], path: Path = THROUGHPUT_FILE) -> None:
    from harness.checkpoint import atomic_path
    header = ("# Measured seconds per unit of work (analysis/estimate.py). One row per item and "
              "settings (key = hash of settings); add rows with\n# `dydiff-bench estimate "
              "--configfile <config> --measure` on the machine they describe.\n")
    rows = sorted(rows, key=lambda r: (r["item"], r["device"], r["threads"], r["key"]))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        f.write(header)
        w = csv.DictWriter(f, COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows({k: r[k] for k in COLUMNS} for r in rows)


# Work that runs on the CPU in a GPU job too (MuJoCo, start-up, MLflow, the analysis): priced
# from CPU rows whatever the job's device.
CPU_ITEMS = {"env-step", "job-start", "job-tracking", "maze2d-generate", "analysis-rep",
             "analysis-fixed"}


def item_device(it: Item, job_device: str) -> str:
    return "cpu" if it.name in CPU_ITEMS else job_device


def lookup(rows: list[dict], it: Item, device: str, threads: int) -> dict | None:
    """The table's row for an item: same settings and device, the nearest thread count."""
    key = it.key
    same = [r for r in rows if r["item"] == it.name and r["key"] == key and r["device"] == device]
    return min(same, key=lambda r: (abs(r["threads"] - threads), r["date"]), default=None)


@dataclass
class JobCost:
    """A job's expected seconds on its own device (`seconds`; None for a GPU job whose items
    have no GPU rows yet) and the same job timed with CPU rows (`cpu_seconds`)."""
    spec: dict
    seconds: float | None
    cpu_seconds: float
    threads: int
    gpu: bool
    missing: list[Item]          # items with no CPU row (the estimate cannot go on without)
    missing_gpu: list[Item]      # items of a GPU job with no GPU row (priced "not measured")

    @property
    def wall_seconds(self) -> float:
        """For the schedule: its own device's time, else the CPU timing (an upper bound)."""
        return self.seconds if self.seconds is not None else self.cpu_seconds


def plan_costs(cfg: dict, rows: list[dict], threads: int | None = None) -> list[JobCost]:
    """Every job of the grid with its expected seconds (missing items add nothing)."""
    out = []
    for spec in plan.all_jobs(cfg):
        job_threads, gpu = job_resources(cfg, spec)
        own, on_cpu, missing, missing_gpu = 0.0, 0.0, [], []
        for it in job_items(cfg, spec):
            cpu_row = lookup(rows, it, "cpu", threads or job_threads)
            if cpu_row is None:
                missing.append(it)
            else:
                on_cpu += cpu_row["seconds"] * it.count
            device = item_device(it, "cuda" if gpu else "cpu")
            row = cpu_row if device == "cpu" else lookup(rows, it, device,
                                                         threads or job_threads)
            if row is None:
                (missing_gpu if gpu and it.name not in CPU_ITEMS else missing).append(it)
            else:
                own += row["seconds"] * it.count
        out.append(JobCost(spec, None if missing_gpu else own, on_cpu, job_threads, gpu,
                           list(dict.fromkeys(missing)), missing_gpu))
    return out


def missing_items(costs: list[JobCost], gpu: bool = False) -> dict[tuple[str, str], Item]:
    return {(it.name, it.key): it for c in costs
            for it in (c.missing_gpu if gpu else c.missing)}

