"""The prepared GPU check: on a machine with a GPU, in a few minutes, what CPU tests cannot say.

    bash scripts/gpu_check.sh run                       # on the GPU machine (installs, then this)
    python scripts/gpu_check.py --out OUT               # this step alone
    python scripts/gpu_check.py --out OUT --device cpu --quick   # the same path dry-run on a CPU
    python scripts/gpu_check.py --to-table OUT/results.jsonl     # keep its GPU rows (here, after)

Items, most valuable first; each appends one or more JSON lines to OUT/results.jsonl the moment
it finishes (flushed and fsynced), so a timeout or a late crash still returns what was done:

1. environment: torch, its CUDA, the GPU's name and driver, the deterministic flags.
2. main throughput: the GPU rows that decide the paper grid's cost, every rule on the GPU
   (analysis/measuring.py): a DyDiff rollout of config/paper.yaml per task dimensions at the
   job's rollout_batch_size (2048 start states) and the diffusion training steps (fused Adam
   and EMA as dydiff.diffusion trains), heaviest first (by the CPU table's seconds x count).
3. determinism and resume, tiny grid: the models DyDiff-TD3BC starts from (its registry entry's
   `models`) trained twice with `deterministic: true`: identical weights? The policy job twice,
   and once cut at half way and resumed: identical to the uninterrupted run? The diffusion model
   alone twice with `deterministic: false` (recorded, not a pass/fail: cuDNN may differ).
4. levers: scripts/gpu_levers.py's checks when that module is in the tree (precision,
   torch.compile, CUDA graphs), else one line saying it is not.
5. other throughput: the remaining GPU rows (the other DyDiff agents' rollouts first, then
   agent updates, ensemble and reward training, ensemble rollouts), while the budget lasts.
6. estimate: config/paper.yaml priced with the new rows (OUT/estimate.md), with the arithmetic
   GPU-hours beside.

Time budget on one H100 (machine start excluded), by arithmetic:
  gpu_check.sh: install from wheels 15 s + nvidia-smi 1 s + pytest tests/test_devices.py 30 s  46 s
  1. environment (CUDA start)                                                            5 s
  2. 3 DyDiff rollout rows: one call of 2048 starts = 2048 x 2 injections x 67 network
     passes x 3.21 GFLOP = 8.8e14 FLOP, at 40-160 TFLOP/s (fp32 .. tf32 convolutions):
     5.5-22 s + a warm-up, x 3 tasks' dims                                           <= 75 s
     3 diffusion-train rows: 6 steps of ~50 ms + building                              10 s
  3. tiny grid: 3 models x 2, policy job x 3 (300 updates, 2 evaluations), diffusion x 2 60 s
  4. levers: their module's own budget                                               <=120 s
  5. other rows: 6 DyDiff rollouts of ~7-25 s, ~35 items of ~1-2 s, none started
     after --budget-s (300 s)                                                        <= 30 s
  6. estimate of the paper grid (plan, report, arithmetic)                              15 s
  gpu_check.py: ~315 s, cut by gpu_check.sh's `timeout 360`; with the 46 s: <= 406 s < 7 min.
Items 2 and 5 start no measurement once --budget-s has passed since this script started; the
items left are listed in results.jsonl, never silently dropped.

Files under OUT (gpu_check.sh adds nvidia-smi.txt, pytest.txt and gpu_check.log): results.jsonl
and estimate.md. Work files (checkpoints, trained tiny models) go to --work, a temporary folder
outside OUT by default, removed at the end. Exit code: 0 only when every check passed (levers
included when present); 1 otherwise, with the failing checks named in the last line.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from harness import plan, registry, runtime  # noqa: E402

TINY = ROOT / "tests" / "configs" / "tiny.yaml"
PAPER = ROOT / "config" / "paper.yaml"
TASK = "hopper-medium-replay"
METHOD = "dydiff-td3bc"
RESULTS = "results.jsonl"
LEVERS = ROOT / "scripts" / "gpu_levers.py"
# Every rule kind on the GPU: the estimate then lacks (and measures) a GPU row for every item.
ALL_ON_GPU = {"devices": {k: "cuda" for k in ("diffusion", "ensemble", "reward", "policy",
                                              "rollout_error")}}
# --quick: the paper DyDiff rollout's timing path (its U-Net, its generator) at one start state
# and 2 sampler steps (3 network passes a sample instead of 67): on one CPU core the paper's
# 67 take ~22 s for one start.
QUICK_STARTS, QUICK_SAMPLER_STEPS = 1, 2


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Results:
    """OUT/results.jsonl: one JSON object a line, appended, flushed and fsynced as each item
    finishes. A row's `ok` is True / False for a check, absent for a measurement."""

    def __init__(self, path: Path):
        self.path, self.t0 = path, time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, row: dict) -> None:
        row = {**row, "elapsed_s": round(time.perf_counter() - self.t0, 1)}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


# ---- 1. environment ---------------------------------------------------------------------------

def environment_row(device: str) -> dict:
    from harness.provenance import environment
    return {"item": "environment", "device": runtime.device_record(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "driver": runtime.driver_version(),
            "gpu": (torch.cuda.get_device_name() if device.startswith("cuda")
                    and torch.cuda.is_available() else None),
            "software": environment(), "command": " ".join(sys.argv)}


# ---- 2, 5. throughput -------------------------------------------------------------------------

def is_main(key: tuple[str, str], it) -> bool:
    """A DyDiff rollout or diffusion training step: the paper grid's cost."""
    from analysis.work_items import _settings
    return key[0] == "diffusion-train" or (
        key[0] == "rollout" and "diffusion" in _settings(it).get("models", {}))


def throughput_plan(config: Path, quick: bool) -> tuple[list, list]:
    """(main, other) [(key, item)] of `config`'s work with every rule on the GPU, each list
    heaviest first (CPU table seconds x count over the grid: the rows the estimate leans on).
    quick: the heaviest item of each kind only, rollouts at QUICK_STARTS start states and
    QUICK_SAMPLER_STEPS sampler steps, diffusion steps on QUICK_STARTS segments."""
    from analysis import estimate as E
    from analysis.work_items import _settings, item
    everything = plan.load_config(config, ALL_ON_GPU)
    rows = E.read_table()
    weight: dict = {}
    items: dict = {}
    for cost in E.plan_costs(everything, rows):
        for it in cost.missing_gpu:
            row = E.lookup(rows, it, "cpu", 1)
            key = (it.name, it.key)
            items[key] = it
            weight[key] = weight.get(key, 0.0) + (row["seconds"] if row else 1.0) * it.count
    ordered = sorted(items, key=lambda k: -weight[k])
    if quick:
        firsts: dict = {}
        for k in ordered:
            firsts.setdefault((k[0], is_main(k, items[k])), k)
        ordered = list(firsts.values())
        for k in ordered:
            s = _settings(items[k])
            if k[0] == "rollout":
                s["rollout"] = {**s["rollout"], "rollout_batch_size": QUICK_STARTS}
                if "diffusion" in s["models"]:
                    diffusion = s["models"]["diffusion"]
                    s["models"] = {**s["models"], "diffusion": {**diffusion, "sampler": {
                        **diffusion.get("sampler", {}), "num_steps": QUICK_SAMPLER_STEPS}}}
                items[k] = item(k[0], s, items[k].count)
            if k[0] == "diffusion-train":  # the paper U-Net on one segment a step
                s["config"] = {**s["config"], "batch_size": QUICK_STARTS}
                items[k] = item(k[0], s, items[k].count)
    # Main: the diffusion steps and one DyDiff rollout per task's dimensions (the U-Net's cost;
    # the agent injecting actions adds <0.1 %); the other agents' rollouts lead the rest.
    main, other, dims = [], [], set()
    for k in ordered:
        s = _settings(items[k])
        first = (s["obs_dim"], s["act_dim"]) not in dims
        if is_main(k, items[k]) and (k[0] == "diffusion-train" or first):
            dims |= {(s["obs_dim"], s["act_dim"])} if k[0] == "rollout" else set()
            main.append((k, items[k]))
        else:
            other.append((k, items[k]))
    other.sort(key=lambda ki: not is_main(*ki))  # stable: heaviest first within each group
    return main, other


def measure_items(todo: list, device: str, results: Results, deadline: float, what: str,
                  dry_run: bool) -> list[dict]:
    """Time each item on `device`, one results row each, until `deadline` (perf_counter);
    the items left are listed in one row. Returns the table rows."""
    from analysis import measuring
    new = []
    for i, (key, it) in enumerate(todo):
        if time.perf_counter() > deadline:
            left = [f"{k[0]} {k[1]}" for k, _ in todo[i:]]
            results.append({"item": f"{what}-not-measured", "reason": "budget (--budget-s)",
                            "count": len(left), "items": left})
            log(f"{what}: budget spent, {len(left)} item(s) left unmeasured")
            break
        t0 = time.perf_counter()
        row = measuring.measure_missing([], [], threads=1, command="scripts/gpu_check.py",
                                        log=log, device=device, only={key: it})[0]
        results.append({"item": "throughput", "group": what, "dry_run": dry_run,
                        "measure_s": round(time.perf_counter() - t0, 1), "row": row})
        new.append(row)
    return new


# ---- 3. determinism and resume ----------------------------------------------------------------

def train_models(dataset, cfg: dict, out: Path, device: str, deterministic: bool = True,
                 only: tuple[str, ...] | None = None) -> dict:
    """The tiny grid's models METHOD trains from (its registry entry), seed 0, on `device`;
    returns {model: dir}."""
    runtime.use_device(device, deterministic)
    dirs = {}
    for kind in only or registry.method(METHOD).models:
        job = plan.model_job(cfg, kind, TASK, 0)
        dirs[kind] = out / kind
        registry.resolve(registry.MODELS[kind].train)(
            dataset, job["config"]["model"], dirs[kind], 0, None, False, device=device)
    return dirs


def policy_run(dataset, cfg: dict, dirs: dict, out: Path, device: str, stop_at=None):
    """The tiny grid's METHOD offline loop on `device` (a cut at `stop_at`, or whole)."""
    from harness.config import from_dict
    from harness.training.offline_loop import offline_loop
    from harness.training.policy import PolicyConfig, make_agent
    runtime.use_device(device, True)
    pcfg = from_dict(PolicyConfig, plan.policy_settings(cfg, METHOD, TASK), where="policy")
    runtime.seed_everything(0)
    agent = make_agent(METHOD, dataset, pcfg).to(device)
    gen = registry.resolve(registry.method(METHOD).generator)(dataset, dict(pcfg.rollout),
                                                             dirs, torch.device(device))
    table = offline_loop(agent, dataset, pcfg.offline, out, 0, generator=gen, progress=False,
                         stop_at=stop_at)
    return agent, table


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_tables(a, b) -> bool:
    cols = [c for c in a.columns if c != "wall_time_s"]
    return a[cols].equals(b[cols])


def model_weights(path: Path) -> dict:
    from harness.checkpoint import load_checkpoint
    blob = load_checkpoint(path / "model.pt")
    state = blob["ema"] if "ema" in blob else blob["model"]  # diffusion keeps its EMA net
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def determinism_and_resume(device: str, work: Path, results: Results) -> None:
    from datagen.generate import random_dataset
    cfg = plan.load_config(TINY)
    dataset = random_dataset("hopper", 3000, seed=0)
    dataset.name = TASK
    t0 = time.perf_counter()
    dirs_a = train_models(dataset, cfg, work / "a", device)
    dirs_b = train_models(dataset, cfg, work / "b", device)
    per_model = {k: same_state(model_weights(dirs_a[k]), model_weights(dirs_b[k]))
                 for k in dirs_a}
    results.append({"item": "models_identical_deterministic", "ok": all(per_model.values()),
                    "models": per_model, "seconds": round(time.perf_counter() - t0, 1)})
    t0 = time.perf_counter()
    agent_a, table_a = policy_run(dataset, cfg, dirs_a, work / "pa", device)
    agent_b, table_b = policy_run(dataset, cfg, dirs_a, work / "pb", device)
    results.append({"item": "policy_identical_deterministic",
                    "ok": same_state(agent_a.state_dict(), agent_b.state_dict())
                    and same_tables(table_a, table_b),
                    "seconds": round(time.perf_counter() - t0, 1)})
    t0 = time.perf_counter()
    half = plan.policy_settings(cfg, METHOD, TASK)["offline"]["total_steps"] // 2
    policy_run(dataset, cfg, dirs_a, work / "pc", device, stop_at=half)
    agent_c, table_c = policy_run(dataset, cfg, dirs_a, work / "pc", device)
    results.append({"item": "policy_resumed_equals_uninterrupted", "cut_at": half,
                    "ok": same_state(agent_a.state_dict(), agent_c.state_dict())
                    and same_tables(table_a, table_c),
                    "seconds": round(time.perf_counter() - t0, 1)})
    # Without deterministic kernels, the diffusion model alone (cuDNN's Conv1d backward): a
    # measurement of what `deterministic: false` gives up, not a check.
    t0 = time.perf_counter()
    nd = [train_models(dataset, cfg, work / f"nd{i}", device, deterministic=False,
                       only=("diffusion",))["diffusion"] for i in (0, 1)]
    results.append({"item": "diffusion_identical_without_deterministic",
                    "identical": same_state(model_weights(nd[0]), model_weights(nd[1])),
                    "seconds": round(time.perf_counter() - t0, 1)})
    runtime.use_device(device, True)


# ---- 4. levers ----------------------------------------------------------------------------------

def levers(device: str, quick: bool, results: Results, work: Path) -> None:
    """scripts/gpu_levers.py's `run(device, quick, append_row, workdir) -> bool`, when present."""
    if not LEVERS.exists():
        results.append({"item": "levers", "status": "levers: not present in this tree",
                        "ok": None})
        return
    spec = importlib.util.spec_from_file_location("gpu_levers", LEVERS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run: Callable = module.run
    work.mkdir(parents=True, exist_ok=True)
    ok = run(device=device, quick=quick, append_row=results.append, workdir=work)
    results.append({"item": "levers", "ok": bool(ok)})


# ---- 6. estimate --------------------------------------------------------------------------------

def estimate(config: Path, new_rows: list[dict], dry_run: bool, out: Path, results: Results
             ) -> None:
    """`config` priced with the table and the new GPU rows (a dry run's rows are not GPU rows)."""
    from analysis import estimate as E
    cfg = plan.load_config(config)
    rows = E.read_table() + ([] if dry_run else new_rows)
    name = (str(config.resolve().relative_to(ROOT)) if config.resolve().is_relative_to(ROOT)
            else str(config))
    text = E.report(cfg, E.plan_costs(cfg, rows), 100, False, rows, name)
    (out / "estimate.md").write_text(text + "\n")
    lines = text.splitlines()
    at = next((i for i, line in enumerate(lines) if "arithmetic, not measured" in line), None)
    arithmetic = [] if at is None else lines[at:]
    results.append({"item": "estimate", "config": name, "file": "estimate.md",
                    "arithmetic_lines": arithmetic})
    print(text)


# ---- the run ------------------------------------------------------------------------------------

def run_item(results: Results, name: str, fn, *args) -> None:
    """Run one item; a crash is a failed row with its traceback, and the next item still runs."""
    t0 = time.perf_counter()
    log(f"{name} ...")
    try:
        fn(*args)
    except Exception as err:  # noqa: BLE001 - every item's failure is recorded, not raised
        results.append({"item": name, "ok": False, "error": f"{type(err).__name__}: {err}",
                        "traceback": traceback.format_exc()})
        log(f"{name} FAILED: {type(err).__name__}: {err}")
        return
    log(f"{name} done in {time.perf_counter() - t0:.0f} s")


def failures(rows: list[dict]) -> list[str]:
    return [r["item"] for r in rows if r.get("ok") is False]


def to_table(results_file: Path) -> int:
    """Add the GPU rows of a check's results.jsonl to analysis/throughput.csv (dry-run rows,
    measured on a CPU with fewer start states, are never added)."""
    from analysis import estimate as E
    from analysis.pricing import COLUMNS
    rows = [json.loads(line) for line in results_file.read_text().splitlines() if line]
    new = [{k: r["row"][k] for k in COLUMNS} for r in rows
           if r.get("item") == "throughput" and not r.get("dry_run")]
    for r in new:
        r["seconds"], r["threads"] = float(r["seconds"]), int(r["threads"])
    table = E.read_table()
    keep = {(r["item"], r["key"], r["device"]) for r in new}
    E.write_table([r for r in table if (r["item"], r["key"], r["device"]) not in keep] + new)
    print(f"{len(new)} GPU row(s) of {results_file} into {E.THROUGHPUT_FILE.name}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="folder for the results (results.jsonl, estimate.md)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run)")
    p.add_argument("--quick", action="store_true",
                   help="one throughput item per kind; rollouts at one start state, 2 sampler steps")
    p.add_argument("--config", type=Path, default=PAPER, help="grid to price (paper.yaml)")
    p.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    p.add_argument("--budget-s", type=float,
                   help="no new throughput measurement starts after this many seconds "
                        "(default 300; none with --quick: a dry run measures each path)")
    p.add_argument("--to-table", type=Path, metavar="RESULTS_JSONL",
                   help="add a check's GPU rows to analysis/throughput.csv, and nothing else")
    args = p.parse_args(argv)
    if args.to_table:
        return to_table(args.to_table)
    if args.out is None:
        p.error("--out is required")
    out = args.out.resolve()
    work = (args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))).resolve()
    if work.is_relative_to(out):
        p.error(f"--work {work} is inside --out: work files would count against its files")
    results = Results(out / RESULTS)
    budget = args.budget_s if args.budget_s is not None else (math.inf if args.quick else 300.0)
    deadline = time.perf_counter() + budget
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    dry_run = device == "cpu" or args.quick
    run_item(results, "device", runtime.use_device, args.device, True)
    run_item(results, "environment", lambda: results.append(environment_row(args.device)))
    if failures(results.rows()):  # no usable device: what was found is the result
        results.append({"item": "summary", "ok": False, "failed": failures(results.rows())})
        return 1
    new: list[dict] = []
    todo: dict[str, list] = {}

    def main_throughput():
        todo["main"], todo["other"] = throughput_plan(args.config, args.quick)
        new.extend(measure_items(todo["main"], device, results, deadline, "main", dry_run))

    def other_throughput():
        if "other" not in todo:
            raise RuntimeError("no throughput plan (main-throughput failed before making it)")
        new.extend(measure_items(todo["other"], device, results, deadline, "other", dry_run))
    run_item(results, "main-throughput", main_throughput)
    run_item(results, "determinism", determinism_and_resume, args.device, work / "tiny",
             results)
    run_item(results, "levers", levers, args.device, args.quick, results, work / "levers")
    run_item(results, "other-throughput", other_throughput)
    run_item(results, "estimate", estimate, args.config, new, dry_run, out, results)
    shutil.rmtree(work, ignore_errors=True)
    failed = failures(results.rows())
    results.append({"item": "summary", "ok": not failed, "failed": failed})
    log(f"{'all checks passed' if not failed else 'FAILED: ' + ', '.join(failed)} "
        f"({out / RESULTS})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
