"""Policy evaluation in the gymnasium MuJoCo v5 simulator with D4RL-normalised scores."""
from __future__ import annotations

import numpy as np
import torch

from dydiff.envs import make_env, normalized_score


def _agent_device(agent) -> torch.device:
    try:
        return next(agent.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def evaluate(agent, task: str, episodes: int, seed: int) -> dict:
    """Run `episodes` episodes with deterministic actions; one batched policy call per step.

    Episodes run side by side in separate envs (episode i reset with seed + i); an env that
    has finished is simply no longer stepped, which avoids vector-env autoreset subtleties.
    Returns return_mean, return_std, normalized_score (of the mean return),
    normalized_score_std (across episodes) and the episode lengths.
    """
    if episodes < 1:
        raise ValueError(f"evaluate: episodes must be >= 1, got {episodes}")
    envs = [make_env(task) for _ in range(episodes)]
    obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])
    returns = np.zeros(episodes)
    lengths = np.zeros(episodes, dtype=np.int64)
    active = np.ones(episodes, dtype=bool)
    dev = _agent_device(agent)
    try:
        while active.any():
            idx = np.flatnonzero(active)
            obs_t = torch.as_tensor(obs[idx], dtype=torch.float32, device=dev)
            actions = agent.act(obs_t, deterministic=True).cpu().numpy()
            for j, i in enumerate(idx):
                obs[i], reward, terminated, truncated, _ = envs[i].step(actions[j])
                returns[i] += reward
                lengths[i] += 1
                if terminated or truncated:
                    active[i] = False
    finally:
        for env in envs:
            env.close()
    scores = normalized_score(task, returns)
    return {"return_mean": float(returns.mean()), "return_std": float(returns.std()),
            "normalized_score": float(normalized_score(task, returns.mean())),
            "normalized_score_std": float(scores.std()), "lengths": lengths.tolist()}
