"""Policy training step: method registry -> agent + rollout generator -> offline loop -> final.json.

Every method is (agent kind, generator); model-based methods differ only in the generator,
imported lazily from a 'module:function' string with the signature
`make_generator(dataset, cfg: dict, model_dirs: dict[str, Path], device)`.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dydiff.config import config_hash, from_dict
from dydiff.data.dataset import Dataset
from dydiff.rl.cql import CQL, CQLConfig
from dydiff.rl.offline_loop import OfflineConfig, offline_loop
from dydiff.rl.sac import SAC, SACConfig
from dydiff.rl.td3bc import TD3BC, TD3BCConfig
from dydiff.utils import atomic_write_text, device as default_device, git_sha, load_checkpoint, \
    save_checkpoint, seed_everything

METHODS: dict[str, tuple[str, str | None]] = {
    "td3bc": ("td3bc", None),
    "cql": ("cql", None),
    "mopo": ("sac", "baselines.mopo:make_generator"),
    "mbpo": ("sac", "baselines.mbpo:make_generator"),
    "dydiff-td3bc": ("td3bc", "dydiff.rollout:make_generator"),
    "dydiff-cql": ("cql", "dydiff.rollout:make_generator"),
}


@dataclass
class PolicyConfig:
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    td3bc: TD3BCConfig = field(default_factory=TD3BCConfig)
    cql: CQLConfig = field(default_factory=CQLConfig)
    sac: SACConfig = field(default_factory=SACConfig)
    rollout: dict = field(default_factory=dict)  # passed through to make_generator


def check_method(method: str) -> tuple[str, str | None]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {sorted(METHODS)}")
    return METHODS[method]


def make_agent(kind: str, dataset: Dataset, cfg: PolicyConfig) -> torch.nn.Module:
    if kind == "td3bc":
        return TD3BC.from_dataset(dataset, cfg.td3bc)
    if kind == "cql":
        return CQL(dataset.obs_dim, dataset.act_dim, cfg.cql)
    if kind == "sac":
        return SAC(dataset.obs_dim, dataset.act_dim, cfg.sac)
    raise ValueError(f"unknown agent kind {kind!r}")


AGENT_CONFIGS = {"td3bc": (TD3BC, TD3BCConfig), "cql": (CQL, CQLConfig), "sac": (SAC, SACConfig)}


def save_policy(agent, method: str, path) -> None:
    """The trained agent alone (weights + its config), for later evaluation: `load_policy`."""
    kind, _ = check_method(method)
    save_checkpoint(path, {"method": method, "kind": kind, "obs_dim": agent.obs_dim,
                           "act_dim": agent.act_dim, "config": dataclasses.asdict(agent.cfg),
                           "state_dict": agent.state_dict()})


def load_policy(path, device: str | torch.device = "cpu"):
    """Rebuild the agent saved by `save_policy` (returns agent, method)."""
    blob = load_checkpoint(path)
    if blob is None:
        raise FileNotFoundError(f"no policy file at {path}")
    cls, cfg_cls = AGENT_CONFIGS[blob["kind"]]
    agent = cls(blob["obs_dim"], blob["act_dim"], from_dict(cfg_cls, blob["config"],
                                                            where=f"{path}:config"))
    agent.load_state_dict(blob["state_dict"])
    return agent.to(device).eval(), blob["method"]


def load_agent(path, device: str | torch.device = "cpu"):
    """The agent alone (the `agent_loader` signature the rollout-error study expects)."""
    return load_policy(path, device)[0]


def load_generator_factory(spec: str) -> Callable:
    module, _, func = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"cannot load rollout generator {spec!r}: {err}") from err


def train_policy(method: str, dataset: Dataset, cfg: PolicyConfig, out_dir, seed: int,
                 model_dirs: dict[str, Path] | None = None,
                 log_fn: Callable[[dict, int], None] | None = None,
                 progress: bool = True) -> dict:
    """Train `method` on `dataset`; write and return out_dir/final.json's content.

    Resumes from out_dir/checkpoint.pt if a previous run of the same job was interrupted.
    Also writes out_dir/policy.pt (the final agent; `load_policy` rebuilds it).
    """
    kind, gen_spec = check_method(method)  # fail before any work
    out_dir = Path(out_dir)
    dev = default_device()
    seed_everything(seed)  # deterministic initial weights
    agent = make_agent(kind, dataset, cfg).to(dev)
    generator = None
    if gen_spec is not None:
        factory = load_generator_factory(gen_spec)
        generator = factory(dataset, dict(cfg.rollout),
                            {k: Path(v) for k, v in (model_dirs or {}).items()}, dev)
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
             "config_hash": config_hash({"method": method, **dataclasses.asdict(cfg)})}
    final = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in final.items()}
    atomic_write_text(out_dir / "final.json", json.dumps(final, indent=2) + "\n")
    return final
