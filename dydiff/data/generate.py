"""Build D4RL-style datasets locally from gymnasium MuJoCo v5 (no D4RL / Minari download needed).

D4RL's recipe (Fu et al. 2020, Sec. 5): one online SAC run per task; 'medium' = rollouts of
the policy snapshot that reaches about 1/3 of expert performance, 'medium-replay' = the SAC
replay buffer up to that snapshot, 'expert' = rollouts of the final (expert) policy,
'medium-expert' = medium ++ expert, 'random' = a uniformly random policy. Every file has
infos/qpos + infos/qvel (the simulator state at each observation) so rollouts can be replayed
in the simulator, and attrs recording seed, config hash, SAC steps and the score reached.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from dydiff.config import ConfigError, config_hash, require
from dydiff.data.d4rl import write_hdf5
from dydiff.data.dataset import Dataset, concatenate
from dydiff.envs import DATASET_KINDS, family_of, make_env, normalized_score, task_spec
from dydiff.rl.sac import SAC, SACConfig
from dydiff.utils import (git_sha, load_checkpoint, rng_state, save_checkpoint, seed_everything,
                          set_rng_state)

log = logging.getLogger(__name__)

ActFn = Callable[[np.ndarray], np.ndarray]


def _sim_state(env) -> tuple[np.ndarray, np.ndarray]:
    data = env.unwrapped.data
    return data.qpos.copy(), data.qvel.copy()


def collect(env, act_fn: ActFn, n_steps: int, *, name: str, progress: bool = False,
            desc: str = "collect") -> Dataset:
    """Step `env` for `n_steps` transitions with `act_fn(obs) -> action`, resetting on episode end.

    The env must already be reset-seeded (`make_env(..., seed=...)`); the first episode starts
    from a fresh `reset()` whose randomness continues the env's own seeded stream. The last
    transition is flagged as a timeout when it does not end an episode, so every episode in the
    file is complete (as D4RL's own collection scripts do).
    """
    spec = task_spec(name)
    obs_buf = np.empty((n_steps, spec.obs_dim), np.float32)
    next_buf = np.empty((n_steps, spec.obs_dim), np.float32)
    act_buf = np.empty((n_steps, spec.act_dim), np.float32)
    rew_buf = np.empty(n_steps, np.float32)
    term_buf = np.zeros(n_steps, bool)
    tout_buf = np.zeros(n_steps, bool)
    nq, nv = env.unwrapped.model.nq, env.unwrapped.model.nv
    qpos_buf = np.empty((n_steps, nq), np.float64)
    qvel_buf = np.empty((n_steps, nv), np.float64)

    obs, _ = env.reset()
    for t in tqdm(range(n_steps), desc=desc, disable=not progress, leave=False):
        qpos_buf[t], qvel_buf[t] = _sim_state(env)
        action = act_fn(obs)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        obs_buf[t], act_buf[t], rew_buf[t], next_buf[t] = obs, action, reward, next_obs
        term_buf[t], tout_buf[t] = terminated, truncated and not terminated
        obs = env.reset()[0] if (terminated or truncated) else next_obs
    if not (term_buf[-1] or tout_buf[-1]):
        tout_buf[-1] = True
    return Dataset(obs_buf, act_buf, rew_buf, next_buf, term_buf, tout_buf, name=name,
                   qpos=qpos_buf, qvel=qvel_buf, source="generated")


def random_dataset(task: str, n_steps: int, seed: int, progress: bool = False) -> Dataset:
    """`n_steps` transitions of uniformly random actions in the task's MuJoCo v5 env.

    Named '<family>-random' (D4RL style). Same seed -> identical arrays.
    """
    family = family_of(task)
    if n_steps <= 0:
        raise ValueError(f"n_steps must be positive, got {n_steps}")
    env = make_env(family, seed=seed)
    space = env.action_space
    # All actions drawn up front in one call; they do not depend on the state.
    actions = np.random.default_rng(seed).uniform(space.low, space.high,
                                                  (n_steps, space.shape[0])).astype(np.float32)
    counter = iter(actions)
    try:
        return collect(env, lambda _obs: next(counter), n_steps, name=f"{family}-random",
                       progress=progress, desc=f"{family}-random")
    finally:
        env.close()
