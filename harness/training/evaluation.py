"""Policy evaluation in the gymnasium MuJoCo v5 simulator with D4RL-normalised scores."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from harness.envs import make_env, normalized_score
from harness.runtime import device_of


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
    dev = device_of(agent)
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


def evaluate_step(spec: dict, log_fn=None) -> dict:
    """Job step: the final evaluation of a trained policy on fresh episodes (eval.json, the
    file the analysis reads)."""
    from harness.checkpoint import atomic_write_text
    from harness.runtime import git_sha
    from harness.training.policy import load_policy
    pdir = Path(spec["policy_dir"])
    agent, method = load_policy(pdir / "policy.pt")
    final = json.loads((pdir / "final.json").read_text())
    start = time.perf_counter()
    result = evaluate(agent, spec["task"], episodes=spec["config"]["episodes"],
                      seed=spec["config"]["seed"])
    out = {"method": method, "task": spec["task"], "seed": spec["seed"],
           "normalized_score": result["normalized_score"],
           "normalized_score_std": result["normalized_score_std"],
           "return_mean": result["return_mean"], "return_std": result["return_std"],
           "eval_episodes": spec["config"]["episodes"], "episode_lengths": result["lengths"],
           "steps": final["steps"], "train_wall_time_s": final["wall_time_s"],
           "wall_time_s": time.perf_counter() - start, "git_sha": git_sha(),
           "config_hash": final["config_hash"]}
    atomic_write_text(spec["out"], json.dumps(out, indent=2) + "\n")
    return out
