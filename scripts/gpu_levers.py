"""GPU speed levers (issue 32 item 4): each variant's throughput AND rollout error, in one run.

The levers are harness/levers.py's settings (`levers:` in an experiment config): the precision
of the diffusion U-Net's training step and of the sampler's network call (fp32 / tf32_conv /
tf32 / bf16 autocast), of the agents' updates (fp32 / tf32), and `torch.compile` of the U-Net.
For every variant (VARIANTS) `run` appends one flat JSON-able row per measurement:

  train-step     ms per diffusion training step (the authors' batch 8, horizon 100, paper
                 U-Net: dim 128 x (1, 4, 8), 58.75M parameters), median of timed steps after
                 warm-up; the first step's loss against the fp32 variant's (same weights, same
                 draws) as `rel_err`;
  sampler-call   ms per network call of the sampler at the paper's rollout batch (2048
                 trajectories), and the host's share of it (`host_ms`: the time the call takes
                 to return before the GPU is done; far below `ms` means the GPU never waits for
                 launches, so CUDA graphs cannot pay: docs/performance.md); `rel_err` =
                 ||out - out_fp32|| / ||out_fp32|| on the same input;
  agent-update   ms per TD3+BC update (batch 256, 2 x 256, 17 / 6 dimensions);
  rollout-error  the sampler study's protocol (scripts/sampler_study.py per_start / paired,
                 docs/sampler-study.md) at a reduced size: a diffusion model trained here on
                 random Hopper transitions, policy injection (K = 2, state averaging, clipping;
                 init 'policy', so no ensemble or reward model is needed) with an untrained
                 TD3+BC actor, the same starts and torch seed for every variant; per variant the
                 normalised state MSE against the MuJoCo simulator averaged over each start's
                 alive steps, its ratio to fp32's, the paired difference to fp32 with a
                 bootstrap 95 % CI, and `drift`: the normalised MSE between the variant's and
                 fp32's states (same noise). "fp32-reseed" is fp32 with another seed: the spread
                 a different noise draw alone causes.

Checks (a row's `ok`; `run` returns False if any row fails or a variant raised): outputs
finite; `rel_err` within the precision's tolerance (TOLERANCE, METHOD: tf32 near 3e-4, bf16
1e-3 to 1e-2); a rollout variant not significantly worse than fp32 anywhere (no paired CI
entirely above 0: the sampler study's rule (2)).

Device time, full size on one H100, by arithmetic (3.21 GFLOP per trajectory forward, x 2048 =
6.6 TFLOP per sampler call: ~130 ms strict fp32 at ~50 TFLOP/s, ~30 ms TF32, ~15 ms bf16):
sampler calls 6 variants x 13 calls <= 10 s; train steps 6 x 40 steps at ~20-40 ms <= 10 s;
inductor compiles (paper U-Net forward + backward, forward, the small model) ~2-3 min, the
largest term; the small model's training 1500 steps ~20 s; rollouts 6 variants x 804 network
calls of a small net ~30 s; dataset and simulator on the host ~15 s: ~4 minutes in all.
`quick` shrinks every size (CPU: well under a minute; compiles with the `eager` backend there,
which traces the graph but generates no code: inductor takes ~85 s per compile on one CPU).

Usage:  python scripts/gpu_levers.py --device cuda [--quick] [--out rows.jsonl]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
import traceback
import types
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from harness import levers as L  # noqa: E402

# variant -> Levers fields (the others at their defaults). Compiled variants pair with bf16,
# the fastest precision, to keep the compile time (the run's largest cost) to one per part.
VARIANTS = {
    "train-step": {"fp32": {}, "tf32_conv": {"diffusion_train": "tf32_conv"},
                   "tf32": {"diffusion_train": "tf32"}, "bf16": {"diffusion_train": "bf16"},
                   "fp32+compile": {"compile_train": True},
                   "bf16+compile": {"diffusion_train": "bf16", "compile_train": True}},
    "sampler-call": {"fp32": {"diffusion_sample": "fp32"}, "tf32_conv": {},
                     "tf32": {"diffusion_sample": "tf32"}, "bf16": {"diffusion_sample": "bf16"},
                     "bf16+compile": {"diffusion_sample": "bf16", "compile_sample": True}},
    "agent-update": {"fp32": {}, "tf32": {"agents": "tf32"}},
    "rollout-error": {"fp32": {"diffusion_sample": "fp32"},
                      "fp32-reseed": {"diffusion_sample": "fp32"},
                      "tf32_conv": {}, "tf32": {"diffusion_sample": "tf32"},
                      "bf16": {"diffusion_sample": "bf16"},
                      "bf16+compile": {"diffusion_sample": "bf16", "compile_sample": True}},
}
DEFAULTS = {"train-step": "fp32", "sampler-call": "tf32_conv", "agent-update": "fp32",
            "rollout-error": "tf32_conv"}  # the authors' (harness.levers.Levers defaults)
TOLERANCE = {"fp32": 1e-5, "tf32_conv": 1e-2, "tf32": 1e-2, "bf16": 5e-2}
OBS, ACT = 11, 3  # Hopper

SIZES = {
    "full": {"unet": {"horizon": 100, "dim": 128, "dim_mults": [1, 4, 8]}, "train_batch": 8,
             "train_steps": 40, "call_batch": 2048, "calls": 13, "agent_updates": 60,
             "transitions": 10_000, "model": {"horizon": 32, "dim": 32, "dim_mults": [1, 2, 4],
                                              "batch_size": 64, "train_steps": 1500},
             "sampler": {}, "n_starts": 256, "error_horizon": 100, "reps": 1000},
    "quick": {"unet": {"horizon": 16, "dim": 8, "dim_mults": [1, 2]}, "train_batch": 8,
              "train_steps": 4, "call_batch": 16, "calls": 3, "agent_updates": 6,
              "transitions": 1500, "model": {"horizon": 8, "dim": 8, "dim_mults": [1, 2],
                                             "batch_size": 16, "train_steps": 30},
              "sampler": {"num_steps": 6}, "n_starts": 16, "error_horizon": 14, "reps": 200},
}


# ---- timing ---------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> dict:
    """Median and minimum ms of `fn` over `reps` calls after `warmup` (the first call's
    seconds apart: compiles happen there), and the median host ms: the time `fn` takes to
    return, before the device is synchronised (on a CPU, the same as the whole call)."""
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        fn()
    _sync(device)
    total, host = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t0)
        _sync(device)
        total.append(time.perf_counter() - t0)
    return {"ms": 1e3 * statistics.median(total), "ms_min": 1e3 * min(total),
            "host_ms": 1e3 * statistics.median(host), "first_call_s": first}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


# ---- the parts ------------------------------------------------------------------------------

def train_step_rows(device, size, segments_of) -> list[dict]:
    """One training step of the U-Net per variant, from the same weights and draws."""
    from harness.config import from_dict
    from dydiff.diffusion import (DiffusionConfig, build_denoiser, make_optimizer, train_step)
    cfg = from_dict(DiffusionConfig, {**size["unet"], "batch_size": size["train_batch"],
                                      "lr_rampup_kimg": 0.0}, where="levers unet")
    segments = segments_of(cfg.horizon)
    torch.manual_seed(0)
    base = build_denoiser(cfg, OBS + ACT).to(device)
    rows, ref_loss = [], None
    for name, fields in VARIANTS["train-step"].items():
        net, ema = copy.deepcopy(base), copy.deepcopy(base).requires_grad_(False)
        opt = make_optimizer(net.parameters(), cfg)
        step = [0]

        def one() -> torch.Tensor:
            loss = train_step(net, ema, opt, segments, step[0], cfg)
            step[0] += 1
            return loss
        with L.using(fields):
            torch.manual_seed(1)
            first = float(one())
            row = timed(one, device, warmup=2, reps=size["train_steps"])
        ref_loss = first if ref_loss is None else ref_loss
        row.update(variant=name, rel_err=abs(first - ref_loss) / abs(ref_loss),
                   finite=math.isfinite(first), loss=first)
        rows.append(row)
    return rows


def sampler_call_rows(device, size) -> list[dict]:
    """The sampler's network call (harness levers as edm_sample applies them) at the rollout
    batch, one input for every variant."""
    from harness.config import from_dict
    from dydiff.diffusion import DiffusionConfig, build_denoiser
    from dydiff.sampler import network_call
    cfg = from_dict(DiffusionConfig, size["unet"], where="levers unet")
    torch.manual_seed(0)
    net = build_denoiser(cfg, OBS + ACT).to(device).eval().requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(size["call_batch"], cfg.horizon, OBS + ACT, device=device, generator=g)
    sigma = torch.tensor(1.3, device=device)  # a level inside the churn band
    rows, ref = [], None
    for name, fields in VARIANTS["sampler-call"].items():
        with L.using(fields), torch.no_grad():
            call = network_call(net, torch.float32, device)
            out = call(x, sigma)
            row = timed(lambda: call(x, sigma), device, warmup=2, reps=size["calls"])
        ref = out if ref is None else ref
        row.update(variant=name, rel_err=rel_err(out, ref), finite=bool(out.isfinite().all()))
        rows.append(row)
    return rows


def agent_update_rows(device, size) -> list[dict]:
    """TD3+BC updates under each agents precision (the offline loop's `tf32_flags`)."""
    from agents.flops import timing_batch
    from agents.td3bc import TD3BC, TD3BCConfig
    rows = []
    for name, fields in VARIANTS["agent-update"].items():
        torch.manual_seed(0)
        agent = TD3BC(17, 6, TD3BCConfig()).to(device)
        batch = {k: v.to(device) for k, v in timing_batch(256, 17, 6).items()}
        losses = {}

        def one() -> None:
            with L.tf32_flags(L.levers().agents):
                losses.update(agent.update(batch))
        with L.using(fields):
            row = timed(one, device, warmup=2, reps=size["agent_updates"])
        row.update(variant=name, rel_err=float("nan"),
                   finite=all(math.isfinite(float(v)) for v in losses.values()))
        rows.append(row)
    return rows


def rollout_error_rows(device, size, dataset, workdir: Path) -> list[dict]:
    """Each sampling variant's rollout error against fp32's, the sampler study's protocol at a
    reduced size (module docstring)."""
    import sampler_study as study
    from analysis.rollout_error import select_starts
    from dydiff.diffusion import load_diffusion, train_diffusion
    from dydiff.rollout import dataset_limits
    from harness.training.policy import PolicyConfig, make_agent
    train_diffusion(dataset, {**size["model"], "lr_rampup_kimg": 1.0, "log_every": 100,
                              "checkpoint_every": 10**9, "sampler": size["sampler"]},
                    workdir / "diffusion", seed=0, progress=False, device=device)
    dyn = load_diffusion(workdir / "diffusion", device)
    torch.manual_seed(0)
    agent = make_agent("td3bc", dataset, PolicyConfig()).to(device).eval()
    limits = dataset_limits(dataset, device)
    args = types.SimpleNamespace(n_starts=size["n_starts"], seed=0,
                                 error_horizon=size["error_horizon"])
    starts = select_starts(dataset, args.n_starts, np.random.default_rng(args.seed))
    start_obs = torch.as_tensor(dataset.observations[starts], device=device)
    models, seconds = {}, {}
    for name, fields in VARIANTS["rollout-error"].items():
        torch.manual_seed(1 + (name == "fp32-reseed"))
        t0 = time.perf_counter()
        with L.using(fields), torch.no_grad():
            out = dyn.policy_rollout(start_obs, agent, args.error_horizon, iterative_times=2,
                                     init="policy", limits=limits)
        seconds[name] = time.perf_counter() - t0
        models[name] = types.SimpleNamespace(out={k: v for k, v in out.items()
                                                  if torch.is_tensor(v)})
    values, mask = study.per_start(dataset, agent, models, args)
    hs = [h for h in study.HS if h <= args.error_horizon] or [args.error_horizon]
    diffs = study.paired(values, mask, "fp32", size["reps"], 0, hs)
    sigma = dataset.observations.std(0).astype(np.float64) + 1e-6
    ref_states = models["fp32"].out["next_obs"].double().cpu().numpy()
    rows = []
    for name, d in diffs.items():
        states = models[name].out["next_obs"].double().cpu().numpy()
        drift = float(((((states - ref_states) / sigma) ** 2).mean(-1))[mask].mean())
        worse = {k: v for k, v in d.items() if not k.startswith("own_") and v[1] > 0}
        own, ref = d["own_err_mean"][0], diffs["fp32"]["own_err_mean"][0]
        rows.append({"variant": name, "err_mean": own, "err_ratio_vs_fp32": own / ref,
                     "paired_err_mean": d["err_mean"][0], "paired_err_mean_lo": d["err_mean"][1],
                     "paired_err_mean_hi": d["err_mean"][2], "gap_mean": d["own_gap_mean"][0],
                     "drift_vs_fp32": drift, "worse_than_fp32": ",".join(sorted(worse)),
                     "finite": bool(np.isfinite(states).all()), "seconds": seconds[name],
                     "n_starts": args.n_starts, "error_horizon": args.error_horizon,
                     "rel_err": float("nan")})
    return rows


def check(part: str, row: dict) -> bool:
    """A row's pass: finite; within the precision's tolerance of fp32; not worse than fp32."""
    if not row.get("finite", False):
        return False
    if part == "rollout-error":  # the reseeded reference measures the spread: not judged
        return row["variant"] == "fp32-reseed" or not row["worse_than_fp32"]
    fields = VARIANTS[part][row["variant"]]
    precision = next((v for k, v in fields.items() if k in ("diffusion_train",
                                                            "diffusion_sample")), None)
    precision = precision or ("fp32" if part == "train-step" else "tf32_conv")
    if part == "agent-update" or math.isnan(row["rel_err"]):
        return True
    return row["rel_err"] <= TOLERANCE[precision]


def environment(device: torch.device) -> dict:
    gpu = device.type == "cuda"
    return {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(device) if gpu else "cpu",
            "compile_backend": L.COMPILE_BACKEND}


def run(device: str, quick: bool, append_row: Callable[[dict], None], workdir: Path, *,
        parts: list[str] | None = None, sizes: dict | None = None) -> bool:
    """Every part's variants on `device` (quick: reduced sizes), one row each through
    `append_row` as soon as it is measured; False if any row fails its check or a part
    raised (its traceback's last line in an "error" row). `parts`: a subset of VARIANTS'
    (default all); `sizes`: overrides of SIZES' entries."""
    from datagen.generate import random_dataset
    from dydiff.segments import make_segments
    dev = torch.device(device)
    size = {**SIZES["quick" if quick else "full"], **(sizes or {})}
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    backend = L.COMPILE_BACKEND
    if dev.type == "cpu" and quick:
        L.COMPILE_BACKEND = "eager"  # inductor's codegen alone takes ~85 s per compile here
    ok = True
    try:
        env = {"item": "lever", **environment(dev), "size": "quick" if quick else "paper"}
        made = {}

        def dataset():  # made by the first part that needs it, inside its try (needs MuJoCo)
            if "hopper" not in made:
                made["hopper"] = random_dataset("hopper", size["transitions"], seed=0)
            return made["hopper"]

        def segments_of(horizon: int):
            return make_segments(dataset(), horizon, padding="constant").to(dev)
        measures = {"train-step": lambda: train_step_rows(dev, size, segments_of),
                    "sampler-call": lambda: sampler_call_rows(dev, size),
                    "agent-update": lambda: agent_update_rows(dev, size),
                    "rollout-error": lambda: rollout_error_rows(dev, size, dataset(), workdir)}
        chosen = {p: m for p, m in measures.items() if parts is None or p in parts}
        for part, measure in chosen.items():
            try:
                rows = measure()
            except Exception as err:  # noqa: BLE001 - reported as a failed row, run goes on
                traceback.print_exc()
                append_row({**env, "part": part, "variant": "all", "ok": False,
                            "error": f"{type(err).__name__}: {err}"})
                ok = False
                continue
            base = next((r for r in rows if r["variant"] == DEFAULTS[part]), None)
            for row in rows:
                passed = check(part, row)
                ok &= passed
                if base is not None and "ms" in row:
                    row["speedup_vs_default"] = base["ms"] / row["ms"]
                append_row({**env, "part": part, **row, "levers": json.dumps(
                    VARIANTS[part][row["variant"]], sort_keys=True), "ok": passed})
    finally:
        L.COMPILE_BACKEND = backend
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="reduced sizes (a dry run)")
    p.add_argument("--out", type=Path, default=None, help="append the rows here (JSON lines)")
    p.add_argument("--workdir", type=Path, default=Path("results/measurements/levers"))
    p.add_argument("--parts", default=",".join(VARIANTS), help="a subset of " + ",".join(VARIANTS))
    p.add_argument("--n-starts", type=int, help="rollout-error starts (size's default)")
    p.add_argument("--error-horizon", type=int, help="rollout-error horizon (size's default)")
    args = p.parse_args()
    parts = args.parts.split(",")
    if set(parts) - set(VARIANTS):
        p.error(f"--parts: unknown {sorted(set(parts) - set(VARIANTS))}; known {list(VARIANTS)}")
    sizes = {k: v for k, v in (("n_starts", args.n_starts),
                               ("error_horizon", args.error_horizon)) if v is not None}

    def append(row: dict) -> None:
        line = json.dumps(row, sort_keys=True, default=str)
        print(line, flush=True)
        if args.out is not None:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    ok = run(args.device, args.quick, append, args.workdir, parts=parts, sizes=sizes)
    print("levers:", "all checks passed" if ok else "a check FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
