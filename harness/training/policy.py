"""Policy training step: registry -> agent + rollout generator -> offline loop -> final.json.

Every method is an agent plus, for a model-based one, a rollout generator
(`make_generator(dataset, cfg: dict, model_dirs: dict[str, Path], device)`), both named in
harness/registry.py; model-based methods differ only in their generator.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from harness import registry
from harness.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from harness.config import config_hash, from_dict
from harness.data.dataset import Dataset
from harness.levers import record as levers_record
from harness.provenance import environment
from harness.runtime import device as default_device, device_record, git_sha, seed_everything
from harness.training.offline_loop import OfflineConfig, offline_loop


@dataclass
class PolicyConfig:
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    agent: dict = field(default_factory=dict)    # the method's agent config (registry.Agent)
    rollout: dict = field(default_factory=dict)  # passed through to make_generator


def make_agent(method: str, dataset: Dataset, cfg: PolicyConfig) -> torch.nn.Module:
    """The method's agent with its settings, fitted to the dataset's dimensions."""
    agent = registry.AGENTS[registry.method(method).agent]
    agent_cfg = from_dict(registry.resolve(agent.config), cfg.agent,
                          where=f"policy.methods.{method}.{agent.name}")
    return registry.resolve(agent.cls).from_dataset(dataset, agent_cfg)


def save_policy(agent, method: str, path) -> None:
    """The trained agent alone (weights + its config), for later evaluation: `load_policy`."""
    save_checkpoint(path, {"method": method, "kind": registry.method(method).agent,
                           "obs_dim": agent.obs_dim, "act_dim": agent.act_dim,
                           "config": dataclasses.asdict(agent.cfg),
                           "state_dict": agent.state_dict()})


def load_policy(path, device: str | torch.device = "cpu"):
    """Rebuild the agent saved by `save_policy` (returns agent, method)."""
    blob = load_checkpoint(path)
    if blob is None:
        raise FileNotFoundError(f"no policy file at {path}")
    spec = registry.AGENTS[blob["kind"]]
    cfg = from_dict(registry.resolve(spec.config), blob["config"], where=f"{path}:config")
    agent = registry.resolve(spec.cls)(blob["obs_dim"], blob["act_dim"], cfg)
    agent.load_state_dict(blob["state_dict"])
    return agent.to(device).eval(), blob["method"]


def load_agent(path, device: str | torch.device = "cpu"):
    """The agent alone (what the rollout-error study needs)."""
    return load_policy(path, device)[0]


def train_policy(method: str, dataset: Dataset, cfg: PolicyConfig, out_dir, seed: int,
                 model_dirs: dict[str, Path] | None = None,
                 log_fn: Callable[[dict, int], None] | None = None,
                 progress: bool = True) -> dict:
    """Train `method` on `dataset`; write and return out_dir/final.json's content.

    Resumes from out_dir/checkpoint.pt if a previous run of the same job was interrupted.
    Also writes out_dir/policy.pt (the final agent; `load_policy` rebuilds it).
    """
    spec = registry.method(method)  # fail before any work
    out_dir = Path(out_dir)
    dev = default_device()
    seed_everything(seed)  # deterministic initial weights
    agent = make_agent(method, dataset, cfg).to(dev)
    generator = None
    if spec.generator is not None:
        generator = registry.resolve(spec.generator)(
            dataset, dict(cfg.rollout), {k: Path(v) for k, v in (model_dirs or {}).items()}, dev)
    t0 = time.perf_counter()
    metrics = offline_loop(agent, dataset, cfg.offline, out_dir, seed, generator=generator,
                           log_fn=log_fn, progress=progress)
    save_policy(agent, method, out_dir / "policy.pt")
    evals = metrics.dropna(subset=["normalized_score"])
    last = evals.iloc[-1] if len(evals) else None
    value = lambda key: float(last[key]) if last is not None else float("nan")  # noqa: E731
    final = {"method": method, "task": dataset.name, "seed": seed,
             "normalized_score": value("normalized_score"),
             "return_mean": value("return_mean"), "return_std": value("return_std"),
             "eval_episodes": cfg.offline.eval_episodes,
             "steps": int(metrics["step"].max()) if len(metrics) else 0,
             "wall_time_s": float(metrics["wall_time_s"].max()) if len(metrics)
             else time.perf_counter() - t0,
             "git_sha": git_sha(),
             "config_hash": config_hash({"method": method, **dataclasses.asdict(cfg)}),
             "device": device_record(dev), "levers": levers_record(),
             "environment": environment()}
    final = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in final.items()}
    atomic_write_text(out_dir / "final.json", json.dumps(final, indent=2) + "\n")
    return final


def train_policy_step(spec: dict, log_fn=None) -> dict:
    """Job step: train spec["method"] on the task's dataset with spec["seed"]."""
    from harness.data.sources import load_dataset
    cfg = from_dict(PolicyConfig, spec["config"]["policy"], where=f"policy[{spec['method']}]")
    return train_policy(spec["method"], load_dataset(spec["dataset"]), cfg, Path(spec["out"]),
                        seed=spec["seed"],
                        model_dirs={k: Path(v) for k, v in spec["model_dirs"].items()},
                        log_fn=log_fn, progress=True)
