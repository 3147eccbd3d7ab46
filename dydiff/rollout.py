"""DyDiff rollout generator: policy-injected diffusion trajectories, rewards, truncation, filter.

Per call (authors' exp_specs: rollout_batch_size 2048, rollout_length -1 = the diffusion
horizon, iterative_times 2, filter softmax/hardmax with threshold 0.6 and softmax_temp 0.05;
authors' `OfflineTrainer._rollout_model`, rlkit/trainer.py:248-313):
  1. sample trajectories from start states with policy injection (dydiff.sampler), starting the
     loop from the ensemble's closed-loop policy rollout (`init`, generate_rl.py:99-110), with
     states and actions clipped to the dataset's range at every model -> env conversion
     (`clip`, the authors' LimitsNormalizer),
  2. rewards r(s, a) from the learned reward model,
  3. score every trajectory by its summed predicted reward (`score`: the authors sum all rows,
     rlkit/trainer.py:271-279, before any truncation),
  4. keep a fraction `threshold` of the trajectories by score: hardmax keeps the top ones;
     softmax samples without replacement with probabilities softmax(zscore(score) / temp)
     (Gumbel top-k, so zero-probability ties cannot fail); none keeps all (rlkit/trainer.py:
     235-246),
  5. truncate every kept trajectory after its first terminal state (harness.envs.
     termination_fn on the clipped next states; the terminal transition is stored,
     rlkit/trainer.py:286-313).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch

from harness.config import from_dict, require
from harness.data.dataset import Dataset
from dydiff.sampler import SAMPLER_PRESETS, DiffusionDynamics, Limits
from harness.envs import alive_mask, termination_fn

# The registry model DyDiff's init='ensemble' starts from (harness/registry.py): the single-step
# ensemble as the DyDiff authors train it, not MOPO / MBPO's "ensemble".
ENSEMBLE = "ensemble-dydiff"

@dataclass
class DyDiffConfig:
    iterative_times: int = 2
    rollout_length: int = -1          # transitions per trajectory; -1 = diffusion horizon - 1
    rollout_batch_size: int = 2048    # trajectories per generate call (first N start states)
    filter: Literal["softmax", "hardmax", "none"] = "softmax"  # none: keep every trajectory
    threshold: float = 0.6            # fraction of trajectories kept (softmax / hardmax)
    temp: float = 0.05                # softmax temperature on z-scored returns
    average_states: bool = True       # authors: s^k = (DM(s_0, a^{k-1}) + s^{k-1}) / 2
    # s^0 of the injection loop. ensemble (authors, generate_rl.py:99-110): the single-step
    # ensemble as the authors train it (models.ensemble-dydiff) rolled out by the learning
    # policy; diffusion: an action-unconditioned diffusion sample; policy: diffusion
    # conditioned on pi(s_0) repeated.
    init: Literal["ensemble", "diffusion", "policy"] = "ensemble"
    # The ensemble start's step: random_elite (authors, rlkit/dynamics_model_trainer.py:
    # 212-215): the mean of one elite drawn at random per sample and step; elite_mean (the
    # former here): the mean over the elites' means, a deterministic s^0.
    start_step: Literal["random_elite", "elite_mean"] = "random_elite"
    # Clip states and actions to the dataset's per-dimension [min, max] at every model -> env
    # conversion (authors' LimitsNormalizer, training/dataset.py:455-472); false: never clip.
    clip: bool = True
    # The clip box: normalizer (authors, training/dataset.py:259-264,377-380,455-472): exactly
    # the diffusion normaliser's range, the per-dimension min / max of the observations and
    # actions; with_next_obs (former): states over observations and next observations.
    clip_range: Literal["normalizer", "with_next_obs"] = "normalizer"
    # Filter score: all_rows (authors, rlkit/trainer.py:271-279): sum of r(s_t, a_t) over every
    # row t = 0..T of the trajectory, before truncating at the first terminal; alive_rows: only
    # the transitions up to and including the first terminal.
    score: Literal["all_rows", "alive_rows"] = "all_rows"
    # Override the model's sampler for rollouts: a preset name (dydiff/sampler.py
    # SAMPLER_PRESETS: "authors", "fast"; null keeps the model's), then sampler_steps its steps.
    sampler: str | None = None
    sampler_steps: int | None = None
    # Softmax filter details (authors' sample_data_by_reward_softmax, rlkit/trainer.py:
    # 219-233): trajectories kept int(threshold * N) (1228 of 2048; round: 1229, the former),
    # z-score eps 1e-6 (former 1e-8), probabilities floored p (1 - eps) + eps / N with eps
    # 1e-6 (prob_floor 0: none, the former). Hardmax keeps round(threshold * N), the count of
    # the authors' quantile rule without ties (1229 of 2048).
    keep_rule: Literal["int", "round"] = "int"
    zscore_eps: float = 1e-6
    prob_floor: float = 1e-6

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
        require(self.sampler is None or self.sampler in SAMPLER_PRESETS, "sampler",
                f"unknown sampler preset {self.sampler!r}; known: {sorted(SAMPLER_PRESETS)}")
        require(self.zscore_eps >= 0, "zscore_eps", f"must be >= 0, got {self.zscore_eps}")
        require(0 <= self.prob_floor < 1, "prob_floor",
                f"must be in [0, 1), got {self.prob_floor}")


def n_kept(n: int, fraction: float, rule: Literal["round", "int"] = "round") -> int:
    """Trajectories kept of n: round(fraction * n) or, as the authors' softmax, int(...);
    at least one."""
    k = int(round(fraction * n)) if rule == "round" else int(fraction * n)
    return max(1, min(n, k))


def softmax_filter_logits(returns: torch.Tensor, temp: float, zscore_eps: float = 1e-8,
                          prob_floor: float = 0.0) -> torch.Tensor:
    """Log-probabilities (up to a constant) of the softmax filter: softmax(z / temp), z =
    (R - mean) / (std + zscore_eps), floored to p (1 - prob_floor) + prob_floor / N (the
    authors', rlkit/trainer.py:225-227; computed in float64 there too, as a floor far below
    float32's resolution near p = 1 would vanish)."""
    z = (returns - returns.mean()) / (returns.std(unbiased=False) + zscore_eps)
    logits = z / temp
    if prob_floor > 0:
        p = torch.softmax(logits.double(), 0)
        logits = torch.log(p * (1 - prob_floor) + prob_floor / len(returns))
    return logits


def filter_trajectories(returns: torch.Tensor, fraction: float,
                        kind: Literal["softmax", "hardmax", "none"] = "softmax",
                        temp: float = 0.05, generator: torch.Generator | None = None,
                        keep_rule: Literal["round", "int"] = "round", zscore_eps: float = 1e-8,
                        prob_floor: float = 0.0) -> torch.Tensor:
    """Indices of the kept trajectories: exactly round(fraction * N) for hardmax, n_kept(N,
    fraction, keep_rule) for softmax, at least one; every trajectory, in order, for none (the
    authors' `filter_idx` without a keep_condition, rlkit/trainer.py:245-246). Softmax draws
    without replacement with probabilities p = softmax(z / temp), z = (R - mean) / (std +
    zscore_eps), floored to p (1 - prob_floor) + prob_floor / N (rlkit/trainer.py:224-227).
    (The defaults here are the former ones; DyDiffConfig's are the authors'.)"""
    if kind == "none":
        return torch.arange(len(returns), device=returns.device)
    if kind == "hardmax":
        return returns.topk(n_kept(len(returns), fraction)).indices
    if kind != "softmax":
        raise ValueError(f"filter must be 'softmax', 'hardmax' or 'none', got {kind!r}")
    k = n_kept(len(returns), fraction, keep_rule)
    logits = softmax_filter_logits(returns, temp, zscore_eps, prob_floor)
    # Top-k of logits + Gumbel noise = sampling k without replacement from softmax(logits).
    u = torch.rand(returns.shape, generator=generator, device=returns.device)
    gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
    return (logits + gumbel).topk(k).indices


def trajectory_scores(rewards: torch.Tensor, done: torch.Tensor,
                      last_rewards: torch.Tensor | None = None,
                      rule: Literal["all_rows", "alive_rows"] = "all_rows") -> torch.Tensor:
    """Filter score per trajectory from rewards (N, T) of its T transitions, their terminal
    flags done (N, T), and last_rewards (N,) = r(s_T, pi(s_T)) of the row after the last
    transition.

    all_rows (authors, rlkit/trainer.py:271-279): sum over all T + 1 rows (the last row
    included when given), terminals ignored: rows after a predicted terminal count too.
    alive_rows: sum over the transitions up to and including the first terminal (the ones
    that are stored); the last row is not counted."""
    if rule == "all_rows":
        total = rewards.sum(1)
        return total if last_rewards is None else total + last_rewards
    if rule == "alive_rows":
        return (rewards * alive_mask(done.bool())).sum(1)
    raise ValueError(f"score must be 'all_rows' or 'alive_rows', got {rule!r}")


def dataset_limits(dataset: Dataset, device: torch.device | str = "cpu",
                   next_obs: bool = False) -> Limits:
    """The dataset's per-dimension range: states over the observations (with next_obs: and
    the next observations, the former box), actions over the actions. Without next_obs it is
    exactly the range of the diffusion normaliser, fitted on the observations and actions
    (dydiff/segments.py), as the authors' LimitsNormalizer (training/dataset.py:259-264,
    377-380) whose clip is their box (:455-472)."""
    arrays = (dataset.observations, dataset.next_observations) if next_obs \
        else (dataset.observations,)
    obs = [torch.as_tensor(x, dtype=torch.float32, device="cpu") for x in arrays]
    act = torch.as_tensor(dataset.actions, dtype=torch.float32, device="cpu")
    lo = torch.stack([x.amin(0) for x in obs]).amin(0)
    hi = torch.stack([x.amax(0) for x in obs]).amax(0)
    return Limits(lo.to(device), hi.to(device), act.amin(0).to(device), act.amax(0).to(device))


class DyDiffGenerator:
    """ensemble: the single-step ensemble (EnsembleDynamics) for init='ensemble'; limits: the
    dataset's range (`dataset_limits`) for clip=True."""

    def __init__(self, dynamics: DiffusionDynamics, reward_fn: Callable, done_fn: Callable,
                 cfg: DyDiffConfig, ensemble=None, limits: Limits | None = None):
        if cfg.init == "ensemble" and ensemble is None:
            raise ValueError("init='ensemble' needs the single-step ensemble (ensemble=...)")
        if cfg.clip and limits is None:
            raise ValueError("clip=True needs the dataset's limits (limits=dataset_limits(...))")
        self.dynamics, self.reward_fn, self.done_fn, self.cfg = dynamics, reward_fn, done_fn, cfg
        self.ensemble = ensemble
        self.limits = None if limits is None else limits.to(dynamics.device)
        self.length = (dynamics.horizon - 1 if cfg.rollout_length == -1 else cfg.rollout_length)

    @property
    def rollout_batch_size(self) -> int:
        """Start states per call (the offline loop samples this many real states)."""
        return self.cfg.rollout_batch_size

    @property
    def max_transitions_per_call(self) -> int:
        n = self.cfg.rollout_batch_size
        return (n if self.cfg.filter == "none" else n_kept(n, self.cfg.threshold)) * self.length

    @torch.no_grad()
    def rollout(self, agent, start_obs: torch.Tensor, H: int) -> dict:
        """The generator's trajectories of H transitions from every start state, before reward,
        filter and truncation (`DiffusionDynamics.policy_rollout` with its settings); the
        rollout-error study samples the same way."""
        cfg, dyn = self.cfg, self.dynamics
        start = torch.as_tensor(start_obs, dtype=torch.float32, device=dyn.device)
        return dyn.policy_rollout(start, RolloutPolicy(agent), H, cfg.iterative_times,
                                  cfg.average_states, cfg.init,
                                  self.limits if cfg.clip else None, self.ensemble,
                                  start_step=cfg.start_step)

    @torch.no_grad()
    def generate(self, agent, start_obs: torch.Tensor) -> dict:
        cfg = self.cfg
        roll = self.rollout(agent, start_obs[:cfg.rollout_batch_size], self.length)
        # With clip, every state / action below is already clipped (the authors' model -> env
        # conversion), except obs[:, 0] = the real start state (rlkit/trainer.py:284-297):
        # reward-model and termination inputs are the clipped trajectory.
        obs, act, nxt = roll["obs"], roll["actions"], roll["next_obs"]
        n, t, o = obs.shape
        rew = self.reward_fn(obs.reshape(n * t, o), act.reshape(n * t, -1)).reshape(n, t)
        done = torch.as_tensor(self.done_fn(nxt), device=obs.device).bool()
        alive = alive_mask(done)
        last = (self.reward_fn(roll["last_obs"], roll["last_action"]).reshape(n)
                if cfg.score == "all_rows" else None)
        returns = trajectory_scores(rew, done, last, cfg.score)
        keep = filter_trajectories(returns, cfg.threshold, cfg.filter, cfg.temp, None,
                                   cfg.keep_rule, cfg.zscore_eps, cfg.prob_floor)
        mask = alive[keep]
        pick = lambda x: x[keep][mask]  # noqa: E731  (flat, in trajectory order)
        out = {"obs": pick(obs), "actions": pick(act), "rewards": pick(rew),
               "next_obs": pick(nxt), "terminals": pick(done).float()}
        stats = torch.stack([returns.mean(), returns[keep].mean(),  # one host read for all
                             done.any(1).float().mean()]).tolist()
        out.update(return_mean=stats[0], kept_return_mean=stats[1], terminal_frac=stats[2],
                   action_gap_before=roll["action_gap"][0], action_gap_after=roll["action_gap"][-1])
        return out


class RolloutPolicy:
    """The agent as a rollout queries it: `agent.rollout_action(obs)` where the agent has one
    (an action other than its evaluation action: Diffusion-QL's one reverse-chain sample,
    agents/diffql.py), else `agent.act(obs, deterministic=True)` as before."""

    def __init__(self, agent):
        self.agent = agent

    def act(self, obs: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        rollout_action = getattr(self.agent, "rollout_action", None)
        if rollout_action is not None:
            return rollout_action(obs)
        return self.agent.act(obs, deterministic=deterministic)


def _reward_fn(model) -> Callable:
    """r(s, a) from the reward model: (M, o), (M, a) -> (M,)."""
    def fn(obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return model(obs, act).reshape(obs.shape[0])
    return fn


def make_generator(dataset: Dataset, cfg: dict | DyDiffConfig, model_dirs: dict[str, Path],
                   device: torch.device | str = "cpu") -> DyDiffGenerator:
    """The DyDiff generator from trained models: model_dirs["diffusion"], ["reward"], and
    [ENSEMBLE] (the authors' single-step ensemble) when init == 'ensemble' (loaded through
    harness.registry.load_model, so dydiff/ does not import baselines/). Clip limits come from
    `dataset` (`dataset_limits`)."""
    if not isinstance(cfg, DyDiffConfig):
        cfg = from_dict(DyDiffConfig, cfg, where="policy.rollout")
    need = {"diffusion", "reward"} | ({ENSEMBLE} if cfg.init == "ensemble" else set())
    missing = sorted(need - set(model_dirs))
    if missing:
        hint = (f" (policy.rollout.init 'ensemble' starts policy injection from the trained "
                f"single-step ensemble {ENSEMBLE!r}, models.{ENSEMBLE}: the DyDiff authors', "
                f"not MOPO's 'ensemble'; init 'diffusion' or 'policy' runs without it)"
                if ENSEMBLE in missing else "")
        raise KeyError(f"DyDiff rollouts need trained models {missing} in model_dirs "
                       f"(got {sorted(model_dirs)}){hint}")
    from dydiff.diffusion import load_diffusion
    from dydiff.reward_model import load_reward_model
    dyn = load_diffusion(model_dirs["diffusion"], device, cfg.sampler)
    if cfg.init == "diffusion" and dyn.action_cond_prob >= 1.0:
        raise ValueError(
            f"policy.rollout.init 'diffusion' samples action-free, but the diffusion model at "
            f"{model_dirs['diffusion']} was trained always action-conditioned "
            f"(models.diffusion.action_cond_prob 1, the authors'): train it with "
            f"action_cond_prob < 1 (e.g. 0.9)")
    if cfg.sampler_steps is not None:
        dyn.sampler = dataclasses.replace(dyn.sampler, num_steps=cfg.sampler_steps)
    if dyn.obs_dim != dataset.obs_dim or dyn.act_dim != dataset.act_dim:
        raise ValueError(f"diffusion model at {model_dirs['diffusion']} has obs/act dims "
                         f"{dyn.obs_dim}/{dyn.act_dim}, dataset {dataset.name} has "
                         f"{dataset.obs_dim}/{dataset.act_dim}")
    ensemble = None
    if cfg.init == "ensemble":
        from harness.registry import load_model
        ensemble = load_model(ENSEMBLE, model_dirs[ENSEMBLE], device)
        if ensemble.obs_dim != dataset.obs_dim or ensemble.act_dim != dataset.act_dim:
            raise ValueError(f"ensemble at {model_dirs[ENSEMBLE]} has obs/act dims "
                             f"{ensemble.obs_dim}/{ensemble.act_dim}, dataset {dataset.name} "
                             f"has {dataset.obs_dim}/{dataset.act_dim}")
    reward = load_reward_model(model_dirs["reward"], device)
    limits = (dataset_limits(dataset, dyn.device, cfg.clip_range == "with_next_obs")
              if cfg.clip else None)
    return DyDiffGenerator(dyn, _reward_fn(reward), termination_fn(dataset.name), cfg,
                           ensemble, limits)


__all__ = ["ENSEMBLE", "DyDiffConfig", "DyDiffGenerator", "Limits", "dataset_limits", "filter_trajectories",
           "make_generator", "n_kept", "softmax_filter_logits", "trajectory_scores"]
