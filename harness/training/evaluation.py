"""Policy evaluation in the gymnasium MuJoCo v5 simulator with D4RL-normalised scores."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from harness import checkpoint
from harness.envs import make_env, normalized_score, task_spec
from harness.runtime import device_of


def evaluate(agent, task: str, episodes: int, seed: int, model: str | None = None) -> dict:
    """Run `episodes` episodes with deterministic actions; one batched policy call per step.

    `model`: the simulator model recorded with the training data (its `sim_model`; None = the
    gym id's own), so a policy is scored under the dynamics its data came from.

    Episodes run side by side in separate envs (episode i reset with seed + i); an env that
    has finished is simply no longer stepped, which avoids vector-env autoreset subtleties.
    Returns return_mean, return_std, normalized_score (of the mean return),
    normalized_score_std (across episodes) and the episode lengths.
    """
    if episodes < 1:
        raise ValueError(f"evaluate: episodes must be >= 1, got {episodes}")
    envs = [make_env(task, model=model) for _ in range(episodes)]
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


# What the final evaluation logs into its trial's MLflow run (harness.runner.TRIAL_ROW: the
# training run of the same method, task and seed): eval.json key -> metric. A re-evaluation
# (e.g. another evaluation.final_episodes) logs them again at the same step; the newest value is
# the run's, as the UI, search and `analyze --from-mlflow` read it.
METRICS = {"normalized_score": "eval/normalized_score",
           "normalized_score_last10": "eval/normalized_score_last10",
           "normalized_score_best": "eval/normalized_score_best",
           "normalized_score_std": "eval/normalized_score_std",
           "return_mean": "eval/return_mean", "return_std": "eval/return_std",
           "eval_episodes": "eval/episodes", "wall_time_s": "eval/wall_time_s"}


def last_evaluations(metrics_file: Path, n: int = 10) -> dict:
    """The mean normalised score of the last `n` evaluations during training (its table's
    rows with a score: every `eval_every` steps and the last step) and how many there were."""
    import pandas as pd
    scores = pd.read_parquet(metrics_file, columns=["normalized_score"]).normalized_score
    last = scores.dropna().to_numpy()[-n:]
    if len(last) == 0:
        raise ValueError(f"{metrics_file}: no evaluation during training to score")
    return {"normalized_score_last10": float(last.mean()), "last10_evaluations": len(last)}


def best_evaluation(metrics_file: Path) -> dict:
    """The best normalised score of the evaluations during training and its step: the score
    rule of Diffusion-QL's published numbers (`--ms online`: argmax over its evaluations,
    Diffusion-Policies-for-Offline-RL main.py:122-132). Selected on the evaluation episodes
    themselves, so it is optimistic; tables label it and never mix it with other rules."""
    import pandas as pd
    table = pd.read_parquet(metrics_file, columns=["step", "normalized_score"])
    table = table.dropna(subset=["normalized_score"])
    if len(table) == 0:
        raise ValueError(f"{metrics_file}: no evaluation during training to score")
    best = table.iloc[int(table.normalized_score.to_numpy().argmax())]  # first of ties
    return {"normalized_score_best": float(best.normalized_score),
            "best_evaluation_step": int(best.step)}


def evaluate_step(spec: dict, log_fn=None) -> dict:
    """Job step: the final evaluation of a trained policy on fresh episodes (eval.json, the
    file the analysis reads; its METRICS go to `log_fn` at the policy's last training step).
    eval.json also holds the mean of the last 10 evaluations during training
    (`normalized_score_last10`, OfflineRL-Kit's score rule) and the best of them
    (`normalized_score_best`, Diffusion-QL's); analysis.score_rule picks."""
    from harness.data.d4rl import stored_recording_release, stored_sim_model
    from harness.provenance import environment
    from harness.runtime import device, device_record, git_sha
    from harness.training.policy import load_policy
    pdir = Path(spec["policy_dir"])
    agent, method = load_policy(pdir / "policy.pt", device())
    final = json.loads((pdir / "final.json").read_text())
    model = stored_sim_model(spec["dataset"]) if spec.get("dataset") else None
    # The MuJoCo release the training data was recorded in (None: not recorded): the analysis
    # says when it differs from the one scoring here (analysis.aggregate.physics_note).
    recorded = stored_recording_release(spec["dataset"]) if spec.get("dataset") else None
    start = time.perf_counter()
    result = evaluate(agent, spec["task"], episodes=spec["config"]["episodes"],
                      seed=spec["config"]["seed"], model=model)
    out = {"method": method, "task": spec["task"], "seed": spec["seed"],
           "normalized_score": result["normalized_score"],
           "normalized_score_std": result["normalized_score_std"],
           "return_mean": result["return_mean"], "return_std": result["return_std"],
           "eval_episodes": spec["config"]["episodes"], "episode_lengths": result["lengths"],
           **last_evaluations(pdir / checkpoint.METRICS),  # the offline loop's table
           **best_evaluation(pdir / checkpoint.METRICS),
           "sim_model": model or task_spec(spec["task"]).models[0],
           "dataset_mujoco": recorded,
           "steps": final["steps"], "train_wall_time_s": final["wall_time_s"],
           "wall_time_s": time.perf_counter() - start, "git_sha": git_sha(),
           "config_hash": final["config_hash"],
           "device": device_record(), "environment": environment(),
           "train_device": final.get("device")}
    checkpoint.atomic_write_text(spec["out"], json.dumps(out, indent=2) + "\n")
    if log_fn is not None:
        log_fn({metric: out[key] for key, metric in METRICS.items()}, final["steps"])
        client = getattr(log_fn, "client", None)
        if recorded and client is not None:  # the MLflow row says it too (dataset.mujoco)
            from harness.tracking import retry
            retry(client.set_tag, log_fn.run_id, "dataset.mujoco", recorded)
    return out
