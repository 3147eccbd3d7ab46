"""MuJoCo tasks: gymnasium factories, D4RL reference scores, termination functions, state restore.

Observation layouts match D4RL's (qpos without the x position, then qvel), so D4RL files, Minari
datasets and locally generated ones share one format. Termination functions mirror gymnasium's
v5 `is_healthy` checks and are vectorised over a batch of next observations (numpy or torch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import gymnasium as gym
import numpy as np


@dataclass(frozen=True)
class TaskSpec:
    family: str          # hopper | halfcheetah | walker2d
    gym_id: str          # gymnasium MuJoCo v5 id
    obs_dim: int
    act_dim: int
    ref_min_score: float  # D4RL's REF_MIN_SCORE (random policy return)
    ref_max_score: float  # D4RL's REF_MAX_SCORE (expert return)
    max_episode_steps: int = 1000


# Reference returns from d4rl/infos.py (the -v1/-v2 datasets reuse the -v0 values).
TASKS: dict[str, TaskSpec] = {
    "hopper": TaskSpec("hopper", "Hopper-v5", 11, 3, -20.272305, 3234.3),
    "halfcheetah": TaskSpec("halfcheetah", "HalfCheetah-v5", 17, 6, -280.178953, 12135.0),
    "walker2d": TaskSpec("walker2d", "Walker2d-v5", 17, 6, 1.629008, 4592.3),
}

DATASET_KINDS = ("random", "medium", "medium-replay", "medium-expert", "expert")


def task_spec(name: str) -> TaskSpec:
    """Spec for a family ('hopper') or a D4RL/Minari dataset name ('hopper-medium-v2')."""
    family = family_of(name)
    return TASKS[family]


def family_of(name: str) -> str:
    """'hopper-medium-replay-v2' -> 'hopper'; 'mujoco/walker2d/medium-v0' -> 'walker2d'."""
    key = name.lower()
    if key.startswith("mujoco/"):
        key = key.split("/")[1]
    family = key.split("-")[0]
    if family not in TASKS:
        raise KeyError(f"unknown task {name!r}: known task families are {sorted(TASKS)} "
                       f"(dataset names like 'hopper-medium-v2' or 'mujoco/hopper/medium-v0')")
    return family


def normalized_score(name: str, returns):
    """D4RL normalised score: 100 * (R - random) / (expert - random)."""
    spec = task_spec(name)
    return 100.0 * (np.asarray(returns, dtype=np.float64) - spec.ref_min_score) / (
        spec.ref_max_score - spec.ref_min_score)


def make_env(name: str, seed: int | None = None, **kwargs) -> gym.Env:
    """A gymnasium MuJoCo v5 env for the task family of `name` (with its 1000-step limit)."""
    spec = task_spec(name)
    env = gym.make(spec.gym_id, max_episode_steps=spec.max_episode_steps, **kwargs)
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


def restore_state(env: gym.Env, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
    """Put the simulator exactly in (qpos, qvel) and return the matching observation."""
    base = env.unwrapped
    base.set_state(np.asarray(qpos, dtype=np.float64), np.asarray(qvel, dtype=np.float64))
    return base._get_obs()


def _xp(x):
    """Array namespace (numpy or torch) of x, so one formula serves both."""
    if isinstance(x, np.ndarray):
        return np
    import torch
    return torch


def alive_mask(terminals):
    """(N, T) terminal flags -> (N, T) bool: step t happens iff no terminal came before it (the
    terminal step itself is kept). numpy or torch."""
    xp = _xp(terminals)
    done = terminals.astype(np.int64) if xp is np else terminals.long()
    return (xp.cumsum(done, 1) if xp is np else done.cumsum(1)) - done == 0


def hopper_termination(next_obs):
    # gymnasium Hopper-v5: healthy iff all(|state[1:]| < 100), z > 0.7, |angle| < 0.2,
    # where the observation is qpos[1:] ++ qvel, so z = obs[0], angle = obs[1].
    xp = _xp(next_obs)
    z, angle = next_obs[..., 0], next_obs[..., 1]
    healthy = (xp.abs(next_obs[..., 1:]) < 100).all(-1) & (z > 0.7) & (xp.abs(angle) < 0.2)
    finite = xp.isfinite(next_obs).all(-1)
    return ~(healthy & finite)


def walker2d_termination(next_obs):
    # gymnasium Walker2d-v5: healthy iff 0.8 < z < 2.0 and -1 < angle < 1.
    xp = _xp(next_obs)
    z, angle = next_obs[..., 0], next_obs[..., 1]
    healthy = (z > 0.8) & (z < 2.0) & (angle > -1.0) & (angle < 1.0)
    return ~(healthy & xp.isfinite(next_obs).all(-1))


def halfcheetah_termination(next_obs):
    # HalfCheetah never terminates; a non-finite model state is still treated as terminal.
    return ~_xp(next_obs).isfinite(next_obs).all(-1)


TERMINATION_FNS: dict[str, Callable] = {
    "hopper": hopper_termination,
    "walker2d": walker2d_termination,
    "halfcheetah": halfcheetah_termination,
}


def termination_fn(name: str) -> Callable:
    """Vectorised `done = f(next_obs)` (bool array/tensor of shape batch) for the task."""
    return TERMINATION_FNS[family_of(name)]
