"""GPU-hours by arithmetic, until a GPU measures: each GPU work item's FLOPs x its count, over a
named GPU's peak at a numeric precision x a stated efficiency. Labelled "arithmetic, not
measured" wherever it is shown, and never mixed with the measured rows (analysis/estimate.py
prints it as a table of its own).

FLOPs per unit, counted by torch's FLOP counter on the real networks (on the meta device: no
memory, no time):
    rollout (DyDiff)   denoiser passes per start state (windows x (injections x the
                       sampler's passes per sample, + one sample for init diffusion/policy))
                       x one U-Net forward; the agent's actions and the filter (<0.1 %) left out
    diffusion-train    3 x a forward of the training batch (forward, then backward ~2x)
    agent-update       agents/flops.py's matmul count of one update
Items without a count here (the ensemble's and reward model's steps, MOPO's ensemble
rollouts) leave a job's arithmetic empty rather than under-counted.

Precision levers (issue 32): fp32 strict (CUDA cores), tf32 (tensor cores; what the U-Net's
convolutions run today: cuDNN allows TF32 for convolutions by default), bf16 autocast.
"""
from __future__ import annotations

import functools
import math

from analysis.work_items import Item, _settings
from harness.config import from_dict

# Dense peak FLOP/s (NVIDIA datasheets: H100 SXM5, H200 SXM, A100 SXM4 80GB; sparsity not used).
PEAK = {"H100": {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12},
        "H200": {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12},
        "A100": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12}}
# Fraction of peak assumed, per precision: the figures behind issue 32's arithmetic (one
# paper DyDiff-TD3BC job, 1.8e18 FLOP: 11.5 H100-hours fp32, 3 tf32, 1.8 bf16), i.e. a
# small-channel Conv1d U-Net keeps CUDA cores busier than tensor cores. Assumed, not measured:
# the GPU check's rows replace them.
EFFICIENCY = {"fp32": 0.65, "tf32": 0.34, "bf16": 0.28}
PRECISIONS = tuple(EFFICIENCY)
LABEL = "arithmetic, not measured"


@functools.lru_cache(maxsize=64)
def unet_forward_flops(config_json: str, obs_dim: int, act_dim: int, batch: int = 1) -> float:
    """FLOPs of one denoiser forward on `batch` trajectories (torch's FLOP counter)."""
    import json

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dydiff.diffusion import DiffusionConfig, build_denoiser
    cfg = from_dict(DiffusionConfig, json.loads(config_json), where="models.diffusion")
    d = obs_dim + act_dim
    with torch.device("meta"):
        net = build_denoiser(cfg, d)
        x = torch.zeros(batch, cfg.horizon, d)
        sigma = torch.ones(batch)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, sigma)
    return float(counter.get_total_flops())


def denoiser_passes(rollout: dict, diffusion: dict) -> int:
    """Denoiser passes per start state of one DyDiff generator call (dydiff.sampler's
    policy_rollout / inject with the job's settings)."""
    from dydiff.rollout import DyDiffConfig
    from dydiff.sampler import SamplerConfig, sampler_config
    cfg = from_dict(DyDiffConfig, rollout, where="policy.rollout")
    stored = dict(diffusion.get("sampler") or {})
    if isinstance(cfg.sampler, str):
        import dataclasses
        override = {**dataclasses.asdict(sampler_config(cfg.sampler)),
                    "batch_size": stored.get("batch_size", 4096)}
    else:
        override = dict(cfg.sampler or {})
    if cfg.sampler_steps is not None:
        override["num_steps"] = cfg.sampler_steps
    sampler = from_dict(SamplerConfig, {**stored, **override}, where="sampler")
    horizon = diffusion["horizon"]
    length = horizon - 1 if cfg.rollout_length == -1 else cfg.rollout_length
    windows = math.ceil(length / (horizon - 1))
    per_window = 0 if cfg.init == "ensemble" else sampler.network_evaluations()
    for k in range(cfg.iterative_times):
        warm = sampler.warm_start and (k > 0 or sampler.warm_first)
        per_window += sampler.network_evaluations(warm)
    return windows * per_window


@functools.lru_cache(maxsize=256)
def _agent_update_flops(settings_json: str) -> float:
    import json

    from agents.flops import update_flops
    from analysis.measuring import _agent
    s = json.loads(settings_json)
    return update_flops(_agent(s["agent"], s["config"], s["obs_dim"], s["act_dim"]), s["batch"])


def unit_flops(it: Item) -> float | None:
    """FLOPs of one unit of a GPU work item, or None where this module has no count."""
    import json
    s = _settings(it)
    if it.name == "diffusion-train":
        cfg = s["config"]
        return 3 * unet_forward_flops(json.dumps(cfg, sort_keys=True), s["obs_dim"],
                                      s["act_dim"], cfg.get("batch_size", 8))
    if it.name == "rollout" and "diffusion" in s.get("models", {}):
        diffusion = s["models"]["diffusion"]
        return denoiser_passes(s["rollout"], diffusion) * unet_forward_flops(
            json.dumps(diffusion, sort_keys=True), s["obs_dim"], s["act_dim"])
    if it.name == "agent-update":
        return _agent_update_flops(json.dumps(s, sort_keys=True))
    return None


def gpu_seconds(items: list[Item], gpu: str = "H100") -> dict[str, float] | None:
    """{precision: seconds} of `items` (a GPU job's items that run on the GPU) on `gpu`, or
    None when one of them has no FLOP count."""
    flops = 0.0
    for it in items:
        per = unit_flops(it)
        if per is None:
            return None
        flops += per * it.count
    return {p: flops / (PEAK[gpu][p] * EFFICIENCY[p]) for p in PRECISIONS}


def efficiency_note(gpu: str = "H100") -> str:
    return ("; ".join(f"{p}: {PEAK[gpu][p] / 1e12:g} TFLOP/s peak x {EFFICIENCY[p]:.2f}"
                      for p in PRECISIONS))
