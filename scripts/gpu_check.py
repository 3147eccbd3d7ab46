"""The prepared GPU check (issue: the paper protocol where it has to run). On a machine with a
GPU, in a few minutes, it answers what CPU tests cannot:

1. determinism: the tiny grid's DyDiff-TD3BC job (diffusion, reward and ensemble models, then
   the policy) trained twice with the same seed on the GPU, `deterministic: true`: identical
   weights and logged numbers? And the diffusion model alone with `deterministic: false`?
2. resume: the same policy job cut at half way and resumed: identical to the uninterrupted run?
3. throughput: the GPU rows of analysis/throughput.csv for every work item of config/paper.yaml,
   every rule on the GPU (diffusion training, both samplers, ensemble training and rollouts,
   TD3+BC / CQL / SAC updates, reward model), written to OUT/throughput.csv;
4. the estimate of config/paper.yaml with those rows (OUT/estimate.md).

    python scripts/gpu_check.py --out OUT            # on the GPU machine (scripts/gpu_check.sh)
    python scripts/gpu_check.py --out OUT --device cpu --quick   # the same steps on a CPU

Every result goes to OUT/gpu_check.json with the device and software it ran on. Copy
OUT/throughput.csv over analysis/throughput.csv to keep the GPU rows (a commit of its own).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from harness import plan, runtime  # noqa: E402
from harness.provenance import environment  # noqa: E402

TINY = ROOT / "tests" / "configs" / "tiny.yaml"
PAPER = ROOT / "config" / "paper.yaml"
TASK = "hopper-medium-replay"
METHOD = "dydiff-td3bc"
# Every rule kind on the GPU: the estimate then lacks (and measures) a GPU row for every item.
ALL_ON_GPU = {"devices": {k: "cuda" for k in ("diffusion", "ensemble", "reward", "policy",
                                              "rollout_error")}}


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_models(dataset, cfg, out: Path, device: str, deterministic: bool = True) -> dict:
    """The tiny grid's three models of TASK, seed 0, on `device`; returns {kind: dir}."""
    from harness import registry
    runtime.use_device(device, deterministic)
    dirs = {}
    for kind in ("ensemble", "reward", "diffusion"):
        job = plan.model_job(cfg, kind, TASK, 0)
        dirs[kind] = out / kind
        registry.resolve(registry.MODELS[kind].train)(
            dataset, job["config"]["model"], dirs[kind], 0, None, False, device=device)
    return dirs


def policy_run(dataset, cfg, dirs: dict, out: Path, device: str, stop_at=None):
    """The tiny grid's DyDiff-TD3BC offline loop on `device` (a cut at `stop_at`, or whole)."""
    from harness import registry
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


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                  b.state_dict().values()))


def same_tables(a, b) -> bool:
    cols = [c for c in a.columns if c != "wall_time_s"]
    return a[cols].equals(b[cols])


def model_weights(path: Path) -> dict:
    from harness.checkpoint import load_checkpoint
    blob = load_checkpoint(path / "model.pt")
    state = blob["ema"] if "ema" in blob else blob["model"]  # diffusion keeps its EMA net
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def check_determinism_and_resume(device: str, work: Path) -> dict:
    from datagen.generate import random_dataset
    cfg = plan.load_config(TINY)
    dataset = random_dataset("hopper", 3000, seed=0)
    dataset.name = TASK
    t0 = time.perf_counter()
    dirs_a = train_models(dataset, cfg, work / "a", device)
    dirs_b = train_models(dataset, cfg, work / "b", device)
    models_same = {k: all(torch.equal(x, y) for x, y in
                          zip(model_weights(dirs_a[k]).values(),
                              model_weights(dirs_b[k]).values())) for k in dirs_a}
    log(f"models trained twice in {time.perf_counter() - t0:.0f} s, identical: {models_same}")
    t0 = time.perf_counter()
    agent_a, table_a = policy_run(dataset, cfg, dirs_a, work / "pa", device)
    agent_b, table_b = policy_run(dataset, cfg, dirs_a, work / "pb", device)
    policy_run(dataset, cfg, dirs_a, work / "pc", device, stop_at=150)
    agent_c, table_c = policy_run(dataset, cfg, dirs_a, work / "pc", device)
    result = {"models_identical_deterministic": models_same,
              "policy_identical_deterministic": same_weights(agent_a, agent_b)
              and same_tables(table_a, table_b),
              "policy_resumed_equals_uninterrupted": same_weights(agent_a, agent_c)
              and same_tables(table_a, table_c)}
    log(f"policy job x3 in {time.perf_counter() - t0:.0f} s: {result}")
    # Without deterministic kernels: does the diffusion model (cuDNN's Conv1d backward) differ?
    nd_a = train_models(dataset, cfg, work / "nd_a", device, deterministic=False)["diffusion"]
    nd_b = train_models(dataset, cfg, work / "nd_b", device, deterministic=False)["diffusion"]
    result["diffusion_identical_without_deterministic"] = all(
        torch.equal(x, y) for x, y in zip(model_weights(nd_a).values(),
                                          model_weights(nd_b).values()))
    runtime.use_device(device, True)
    return result


def measure_rows(device: str, out: Path, config: Path, quick: bool) -> str:
    """GPU rows for every item of `config` with every rule on the GPU, into out/throughput.csv;
    returns the estimate of `config` as planned (its own devices) with them."""
    from analysis import estimate as E
    table = out / "throughput.csv"
    shutil.copy(E.THROUGHPUT_FILE, table)
    everything = plan.load_config(config, ALL_ON_GPU)
    rows = E.read_table(table)
    costs = E.plan_costs(everything, rows)
    todo = E.missing_items(costs, gpu=True)
    if quick:  # one item of each kind: the code path, not the table
        firsts = {}
        for k, it in todo.items():
            firsts.setdefault(k[0], (k, it))
        todo = dict(firsts.values())
    log(f"measuring {len(todo)} work item(s) on {device}")
    new = E.measure_missing(costs, rows, threads=1, command="scripts/gpu_check.py", log=log,
                            device=device, only=todo)
    E.write_table(rows + new, table)
    cfg = plan.load_config(config)
    name = str(config.resolve().relative_to(ROOT)) if config.resolve().is_relative_to(ROOT) \
        else str(config)
    return E.report(cfg, E.plan_costs(cfg, rows + new), 100, False, rows + new, name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the results")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run)")
    p.add_argument("--quick", action="store_true", help="one throughput item per kind")
    p.add_argument("--config", type=Path, default=PAPER, help="grid to price (paper.yaml)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runtime.use_device(args.device, True)
    start = time.perf_counter()
    report = {"device": runtime.device_record(), "environment": environment(),
              "command": " ".join(sys.argv)}
    log(f"device {report['device']}")
    work = args.out / "work"
    report["determinism"] = check_determinism_and_resume(args.device, work)
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    text = measure_rows("cuda" if args.device.startswith("cuda") else "cpu", args.out,
                        args.config, args.quick)
    report["throughput_seconds"] = time.perf_counter() - t0
    (args.out / "estimate.md").write_text(text + "\n")
    report["total_seconds"] = time.perf_counter() - start
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(text)
    log(f"done in {report['total_seconds']:.0f} s: {args.out}")
    return 0 if all(v is True for k, v in report["determinism"].items()
                    if k != "diffusion_identical_without_deterministic"
                    and not isinstance(v, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
