"""What a grid will cost before it runs: `dydiff-bench estimate --configfile config/paper.yaml` (cli: harness/cli.py).

Every job of the plan is broken into *work items*, each a count of one measured unit:

    train-policy   agent updates (total_steps) + rollout start states (one per trajectory of
                   each generator call) + evaluation env steps (every eval_every steps)
    train-model    diffusion / reward gradient steps; ensemble minibatches (epochs x rows/batch)
    generate       online SAC env steps + updates, then rollout env steps per dataset kind;
                   maze2d: transitions of D4RL's waypoint controller
    evaluate       env steps of the final evaluation episodes
    rollout-error  start states of the study's models + simulator env steps
    analyze        bootstrap replications over the grid's runs
    every job      a fixed start-up (interpreter, torch, MLflow imports) and its MLflow run

A unit's seconds come from `THROUGHPUT_FILE`, a table of measurements kept in the repository
(one row per item and settings: machine, threads, date and the command that measured it).
`--measure` times every item the grid needs that the table lacks, on this machine, with the
real classes at the job's settings (untrained weights: cost does not depend on them), and adds
rows. Counts are upper bounds where the run decides (episodes and model rollouts that end
early, early stopping: then `ASSUMED_EPOCHS`). Wall time is a list schedule of the DAG on the
profile's parallelism.

The seams, one module each: analysis/work_items.py (jobs -> items), analysis/pricing.py (the
throughput table, jobs priced from it), analysis/measuring.py (timing one item on a device),
analysis/scheduling.py (the DAG's wall time); this module puts them into the report.
"""
from __future__ import annotations

from pathlib import Path

from analysis.measuring import MEASURES, measure, measure_missing  # noqa: F401
from analysis.pricing import (COLUMNS, CPU_ITEMS, THROUGHPUT_FILE, JobCost,  # noqa: F401
                              item_device, job_resources, lookup, machine, missing_items,
                              plan_costs, read_table, write_table, RULE_OF_STEP)
from analysis.scheduling import parallelism, schedule  # noqa: F401
from analysis.work_items import (ASSUMED_EPOCHS, COST_FREE, Item, _settings,  # noqa: F401
                                 item, job_items, settings_key)
from harness.config import ConfigError


def fmt_hours(seconds: float) -> str:
    h = seconds / 3600
    return f"{h:,.1f}" if h >= 10 else f"{h:.2f}"


def fmt_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def report(cfg: dict, costs: list[JobCost], slots: int, by_threads: bool, rows: list[dict],
           config_name: str) -> str:
    """The per-rule table, totals, wall time and the assumptions behind them. CPU-hours are the
    CPU jobs' (seconds x threads); GPU-hours the GPU jobs' from GPU rows, or "not measured" where
    the table has none, with the same jobs timed on CPU in a column of their own."""
    rules: dict[str, dict] = {}
    for c in costs:
        r = rules.setdefault(RULE_OF_STEP[c.spec["step"]],
                             {"jobs": 0, "gpu_jobs": 0, "cpu": 0.0, "gpu": 0.0, "gpu_on_cpu": 0.0,
                              "unmeasured": 0, "max": 0.0})
        r["jobs"] += 1
        r["max"] = max(r["max"], c.wall_seconds)
        if not c.gpu:
            r["cpu"] += c.seconds * c.threads
            continue
        r["gpu_jobs"] += 1
        r["gpu_on_cpu"] += c.cpu_seconds
        if c.seconds is None:
            r["unmeasured"] += 1
        else:
            r["gpu"] += c.seconds

    def gpu_cell(r) -> str:
        if not r["gpu_jobs"]:
            return "-"
        return "not measured" if r["unmeasured"] else fmt_hours(r["gpu"])

    def on_cpu_cell(r) -> str:
        return fmt_hours(r["gpu_on_cpu"]) if r["gpu_jobs"] else "-"
    total = {k: sum(r[k] for r in rules.values()) for k in next(iter(rules.values()))}
    wall = schedule(costs, slots, by_threads)
    lines = [f"Estimate for {config_name} ({len(costs)} jobs, {total['gpu_jobs']} on a GPU)", "",
             "| rule | jobs | GPU jobs | CPU-hours | GPU-hours | GPU jobs timed on CPU (hours) "
             "| longest job |", "|---|---|---|---|---|---|---|"]
    for name, r in rules.items():
        lines.append(f"| {name} | {r['jobs']} | {r['gpu_jobs']} | {fmt_hours(r['cpu'])} | "
                     f"{gpu_cell(r)} | {on_cpu_cell(r)} | {fmt_duration(r['max'])} |")
    lines.append(f"| **total** | {len(costs)} | {total['gpu_jobs']} | {fmt_hours(total['cpu'])} "
                 f"| {gpu_cell(total)} | {on_cpu_cell(total)} | |")
    where = (f"{slots} cores shared by the jobs' threads" if by_threads
             else f"{slots} jobs at once")
    lines += ["", f"Wall time with {where}: {fmt_duration(wall)} (the DAG's list schedule"
              + ("; GPU jobs without GPU rows at their CPU timing" if total["unmeasured"] else "")
              + ").", ""]
    # Each job's items once, then a lookup (matching every row against items recomputed per
    # row made this line quadratic: most of the paper estimate's time).
    keys = {(it.name, it.key) for c in costs for it in job_items(cfg, c.spec)}
    used = {(r["machine"], r["device"], r["threads"], r["date"]) for r in rows
            if (r["item"], r["key"]) in keys}
    lines.append("Throughputs from " + "; ".join(
        f"{m} ({dev}, {t} thread{'s' if t > 1 else ''}, {d})"
        for m, dev, t, d in sorted(used)) + ".")
    if total["gpu_jobs"]:
        lines.append(f"{total['gpu_jobs']} jobs run on a GPU (harness.plan.job_device: "
                     "devices.<kind>, resources.<kind>.gpu, the method's registry entry); MuJoCo, "
                     "start-up and MLflow are priced from CPU rows in them too.")
    if total["unmeasured"]:
        lines.append(f"{total['unmeasured']} of them have no GPU measurements in the table: their "
                     "GPU-hours are not measured (run `dydiff-bench estimate --configfile "
                     f"{config_name} --measure` on a GPU machine, or scripts/gpu_check.sh); the "
                     "column beside gives the same jobs timed on CPU.")
    threads_note = {c.threads for c in costs} - {r["threads"] for r in rows}
    if threads_note:
        lines.append(f"Jobs configured with {sorted(threads_note)} threads are timed at the "
                     "table's nearest thread count.")
    lines.append("Counts are upper bounds where the run decides: evaluation episodes at full "
                 "length; model rollouts that never terminate; models that train until early "
                 "stopping at "
                 + ", ".join(f"{k} {v} epochs" for k, v in ASSUMED_EPOCHS.items()) + ".")
    if total["gpu_jobs"]:
        lines += ["", *arithmetic_table(cfg, costs)]
    return "\n".join(lines)


def arithmetic_table(cfg: dict, costs: list[JobCost], gpu: str = "H100") -> list[str]:
    """The GPU jobs' GPU work priced by arithmetic (analysis/arithmetic.py), per precision
    lever: a table of its own, never summed with the measured one."""
    from analysis import arithmetic as A
    rules: dict[str, dict] = {}
    for c in costs:
        if not c.gpu:
            continue
        r = rules.setdefault(RULE_OF_STEP[c.spec["step"]],
                             {"jobs": 0, "uncounted": 0, **{p: 0.0 for p in A.PRECISIONS}})
        r["jobs"] += 1
        seconds = A.gpu_seconds([it for it in job_items(cfg, c.spec)
                                 if item_device(it, "cuda") != "cpu"], gpu)
        if seconds is None:
            r["uncounted"] += 1
            continue
        for p in A.PRECISIONS:
            r[p] += seconds[p]
    total = {k: sum(r[k] for r in rules.values()) for k in next(iter(rules.values()))}

    def cells(r) -> str:
        if r["uncounted"]:
            return " | ".join(["no FLOP count"] * len(A.PRECISIONS))
        return " | ".join(fmt_hours(r[p]) for p in A.PRECISIONS)
    head = " | ".join(f"{gpu}-hours {p}" + (" (as coded)" if p == "tf32" else "")
                      for p in A.PRECISIONS)
    lines = [f"GPU-hours by {A.LABEL}: FLOPs x {gpu} peak x an assumed efficiency "
             f"({A.efficiency_note(gpu)}; analysis/arithmetic.py). The GPU jobs' network work "
             "only (MuJoCo, start-up and MLflow are in the measured table), never added to it.",
             "",
             f"| rule | GPU jobs | {head} |", "|---|---|" + "---|" * len(A.PRECISIONS)]
    for name, r in rules.items():
        lines.append(f"| {name} | {r['jobs']} | {cells(r)} |")
    lines.append(f"| **total** | {total['jobs']} | {cells(total)} |")
    return lines


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def estimate(cfg: dict, *, config_name: str, profile: str | None = None,
             cores: int | None = None, jobs: int | None = None, measure_missing_items=False,
             table: Path = THROUGHPUT_FILE, threads: int = 1, command: str = "",
             log=print) -> str:
    rows = read_table(table)
    costs = plan_costs(cfg, rows)
    missing = missing_items(costs)
    if missing and measure_missing_items:
        log(f"measuring {len(missing)} work item(s) on this machine's CPU ({threads} thread(s)):")
        rows += measure_missing(costs, rows, threads, command, log)
        write_table(rows, table)
        costs = plan_costs(cfg, rows)
        missing = missing_items(costs)
    missing_gpu = missing_items(costs, gpu=True)
    if missing_gpu and measure_missing_items and _cuda_available():
        log(f"measuring {len(missing_gpu)} work item(s) of the GPU jobs on this machine's GPU:")
        rows += measure_missing(costs, rows, threads, command, log, device="cuda")
        write_table(rows, table)
        costs = plan_costs(cfg, rows)
    if missing:
        names = sorted({f"{it.name} ({it.key})" for it in missing.values()})
        raise ConfigError(f"{table.name} has no measurement for {len(names)} work item(s) of "
                          f"this grid: {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}"
                          f"; add them with `dydiff-bench estimate --configfile {config_name} "
                          f"--measure` (times each on this machine)")
    slots, by_threads = parallelism(profile, cores, jobs)
    return report(cfg, costs, slots, by_threads, rows, config_name)
