"""DyDiff rollout generator: policy-injected diffusion trajectories, rewards, truncation, filter.

Per call (authors' exp_specs: rollout_batch_size 2048, rollout_length -1 = the diffusion
horizon, iterative_times 2, filter softmax/hardmax with threshold 0.6 and softmax_temp 0.05):
  1. sample trajectories from start states with policy injection (dydiff.sampler),
  2. rewards r(s, a) from the learned reward model,
  3. truncate every trajectory after its first terminal state (harness.envs.termination_fn),
  4. keep a fraction `threshold` of the trajectories, ranked by summed predicted reward:
     hardmax keeps the top ones; softmax samples without replacement with probabilities
     softmax(zscore(return) / temp) (Gumbel top-k, so zero-probability ties cannot fail).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch

from harness.config import from_dict, require
from harness.data.dataset import Dataset
from dydiff.sampler import DiffusionDynamics
from harness.envs import alive_mask, termination_fn


@dataclass
class DyDiffConfig:
    iterative_times: int = 2
    rollout_length: int = -1          # transitions per trajectory; -1 = diffusion horizon - 1
    rollout_batch_size: int = 2048    # trajectories per generate call (first N start states)
    filter: Literal["softmax", "hardmax"] = "softmax"
    threshold: float = 0.6            # fraction of trajectories kept
    temp: float = 0.05                # softmax temperature on z-scored returns
    average_states: bool = True       # authors: s^k = (DM(s_0, a^{k-1}) + s^{k-1}) / 2
    init: Literal["diffusion", "policy"] = "diffusion"
    sampler_steps: int | None = None  # override the model's sampler num_steps for rollouts

    def validate(self) -> None:
        require(self.iterative_times >= 0, "iterative_times",
                f"must be >= 0, got {self.iterative_times}")
        require(self.rollout_length == -1 or self.rollout_length >= 1, "rollout_length",
                f"must be -1 (model horizon) or >= 1, got {self.rollout_length}")
        require(self.rollout_batch_size >= 1, "rollout_batch_size", "must be >= 1")
        require(0.0 < self.threshold <= 1.0, "threshold",
                f"must be in (0, 1], got {self.threshold}")
        require(self.temp > 0, "temp", f"must be > 0, got {self.temp}")
        require(self.sampler_steps is None or self.sampler_steps >= 1, "sampler_steps",
                "must be >= 1 or null")


def n_kept(n: int, fraction: float) -> int:
    return max(1, min(n, int(round(fraction * n))))


def filter_trajectories(returns: torch.Tensor, fraction: float,
                        kind: Literal["softmax", "hardmax"] = "softmax", temp: float = 0.05,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices of the kept trajectories (exactly round(fraction * N), at least one)."""
    k = n_kept(len(returns), fraction)
    if kind == "hardmax":
        return returns.topk(k).indices
    if kind != "softmax":
        raise ValueError(f"filter must be 'softmax' or 'hardmax', got {kind!r}")
    z = (returns - returns.mean()) / (returns.std(unbiased=False) + 1e-8)
    # Top-k of logits + Gumbel noise = sampling k without replacement from softmax(logits).
    u = torch.rand(returns.shape, generator=generator, device=returns.device)
    gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
    return (z / temp + gumbel).topk(k).indices


class DyDiffGenerator:
    def __init__(self, dynamics: DiffusionDynamics, reward_fn: Callable, done_fn: Callable,
                 cfg: DyDiffConfig):
        self.dynamics, self.reward_fn, self.done_fn, self.cfg = dynamics, reward_fn, done_fn, cfg
        self.length = (dynamics.horizon - 1 if cfg.rollout_length == -1 else cfg.rollout_length)

    @property
    def rollout_batch_size(self) -> int:
        """Start states per call (the offline loop samples this many real states)."""
        return self.cfg.rollout_batch_size

    @property
    def max_transitions_per_call(self) -> int:
        return n_kept(self.cfg.rollout_batch_size, self.cfg.threshold) * self.length

    @torch.no_grad()
    def generate(self, agent, start_obs: torch.Tensor) -> dict:
        cfg, dyn = self.cfg, self.dynamics
        start = torch.as_tensor(start_obs, dtype=torch.float32, device=dyn.device)
        start = start[:cfg.rollout_batch_size]
        roll = dyn.policy_rollout(start, agent, self.length, cfg.iterative_times,
                                  cfg.average_states, cfg.init)
        obs, act, nxt = roll["obs"], roll["actions"], roll["next_obs"]
        n, t, o = obs.shape
        rew = self.reward_fn(obs.reshape(n * t, o), act.reshape(n * t, -1)).reshape(n, t)
        done = torch.as_tensor(self.done_fn(nxt), device=obs.device).bool()
        alive = alive_mask(done)
        returns = (rew * alive).sum(1)
        keep = filter_trajectories(returns, cfg.threshold, cfg.filter, cfg.temp)
        mask = alive[keep]
        pick = lambda x: x[keep][mask]  # noqa: E731  (flat, in trajectory order)
        out = {"obs": pick(obs), "actions": pick(act), "rewards": pick(rew),
               "next_obs": pick(nxt), "terminals": pick(done).float()}
        out.update(return_mean=float(returns.mean()), kept_return_mean=float(returns[keep].mean()),
                   terminal_frac=float(done.any(1).float().mean()),
                   action_gap_before=roll["action_gap"][0], action_gap_after=roll["action_gap"][-1])
        return out


def _reward_fn(model) -> Callable:
    """r(s, a) from the reward model: (M, o), (M, a) -> (M,)."""
    def fn(obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return model(obs, act).reshape(obs.shape[0])
    return fn


def make_generator(dataset: Dataset, cfg: dict | DyDiffConfig, model_dirs: dict[str, Path],
                   device: torch.device | str = "cpu") -> DyDiffGenerator:
    if not isinstance(cfg, DyDiffConfig):
        cfg = from_dict(DyDiffConfig, cfg, where="policy.rollout")
    missing = sorted({"diffusion", "reward"} - set(model_dirs))
    if missing:
        raise KeyError(f"DyDiff rollouts need trained models {missing} in model_dirs "
                       f"(got {sorted(model_dirs)})")
    from dydiff.diffusion import load_diffusion
    from dydiff.reward_model import load_reward_model
    sampler = {} if cfg.sampler_steps is None else {"num_steps": cfg.sampler_steps}
    dyn = load_diffusion(model_dirs["diffusion"], device, sampler)
    if dyn.obs_dim != dataset.obs_dim or dyn.act_dim != dataset.act_dim:
        raise ValueError(f"diffusion model at {model_dirs['diffusion']} has obs/act dims "
                         f"{dyn.obs_dim}/{dyn.act_dim}, dataset {dataset.name} has "
                         f"{dataset.obs_dim}/{dataset.act_dim}")
    reward = load_reward_model(model_dirs["reward"], device)
    return DyDiffGenerator(dyn, _reward_fn(reward), termination_fn(dataset.name), cfg)


__all__ = ["DyDiffConfig", "DyDiffGenerator", "filter_trajectories",
           "make_generator", "n_kept"]
