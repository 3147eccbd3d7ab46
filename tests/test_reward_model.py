"""DyDiff reward model: learns a known reward, determinism, exact resume, config, load."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from harness.config import ConfigError, from_dict
from harness.data.dataset import Dataset, holdout_split
from dydiff.reward_model import (RewardModel, RewardModelConfig, load_reward_model,
                                 train_reward_model)


def known_reward(obs: np.ndarray, act: np.ndarray) -> np.ndarray:
    """A smooth nonlinear r(s, a) with an offset and scale far from standard (tests the
    target standardisation)."""
    return (3.0 + 2.0 * np.sin(obs[:, 0]) + obs[:, 1] * act[:, 0]
            - 0.5 * (act ** 2).sum(-1)).astype(np.float32)


def reward_dataset(n: int = 4000, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n, 4)).astype(np.float32) * np.array([1.0, 1.0, 5.0, 0.1], np.float32)
    act = rng.uniform(-1, 1, size=(n, 2)).astype(np.float32)
    return Dataset(observations=obs, actions=act, rewards=known_reward(obs, act),
                   next_observations=obs + 0.01, terminals=np.zeros(n, bool),
                   timeouts=np.zeros(n, bool), name="toy-reward")


FAST = {"hidden": [64, 64], "lr": 1e-3, "batch_size": 64, "eval_every": 10, "train_steps": 40,
        "checkpoint_every": 1000}


def test_learns_a_known_reward_function(tmp_path):
    ds = reward_dataset()
    cfg = {"lr": 1e-3, "eval_every": 100, "train_steps": 2500,  # paper net: 256x2, batch 256
           "weight_init": "torch"}  # its first evaluation is the worse (EDM init: the variant)
    summary = train_reward_model(ds, cfg, tmp_path, seed=0, progress=False, device="cpu")
    var = float(ds.rewards.var())
    assert summary["holdout_size"] == 800 and summary["train_size"] == 3200
    assert summary["holdout_mse"] < 0.02 * var, (summary, var)
    m = pd.read_parquet(tmp_path / "metrics.parquet")
    assert list(m.columns) == ["step", "train_loss", "holdout_mse", "wall_time_s"]
    assert m["step"].tolist() == list(range(100, summary["steps"] + 1, 100))
    assert m["holdout_mse"].iloc[-1] < 0.1 * m["holdout_mse"].iloc[0]
    # The loaded model predicts raw reward units on fresh inputs: (M,) output.
    model = load_reward_model(tmp_path)
    fresh = reward_dataset(500, seed=1)
    pred = model(torch.as_tensor(fresh.observations), torch.as_tensor(fresh.actions))
    assert pred.shape == (500,) and not pred.requires_grad
    assert float(((pred.numpy() - fresh.rewards) ** 2).mean()) < 0.03 * var
    # model.pt holds the best holdout weights.
    assert summary["holdout_mse"] == pytest.approx(m["holdout_mse"].min())


def test_early_stopping_stops_and_keeps_best(tmp_path):
    # Pure-noise rewards: the holdout MSE cannot improve for long, so training must stop.
    ds = reward_dataset(1000)
    ds.rewards = np.random.default_rng(3).normal(size=1000).astype(np.float32)
    cfg = {"hidden": [256, 256], "lr": 3e-3, "batch_size": 64, "patience": 2}
    summary = train_reward_model(ds, cfg, tmp_path, seed=0, progress=False, device="cpu")
    m = pd.read_parquet(tmp_path / "metrics.parquet")
    assert summary["early_stopped"] and summary["steps"] == len(m) * 13  # one eval per epoch
    best = int(m["holdout_mse"].to_numpy().argmin())
    assert len(m) == best + 1 + 3  # stops after patience + 1 evaluations without a gain
    assert summary["best_step"] == m["step"].iloc[best]


def test_holdout_split_sizes_and_disjoint():
    cfg = RewardModelConfig()
    split = lambda n: holdout_split(np.random.default_rng(0).permutation(n),  # noqa: E731
                                    cfg.holdout_ratio, cfg.max_holdout)
    tr, ho = split(30_000)
    assert len(ho) == 5000 and len(tr) == 25_000  # capped at max_holdout
    assert len(np.intersect1d(tr, ho)) == 0
    tr, ho = split(1000)
    assert len(ho) == 200


def test_same_seed_same_weights_different_seed_differs(tmp_path):
    ds = reward_dataset(1000)
    for d, seed in (("a", 1), ("b", 1), ("c", 2)):
        train_reward_model(ds, FAST, tmp_path / d, seed=seed, progress=False, device="cpu")
    a, b, c = (torch.load(tmp_path / d / "model.pt", weights_only=True)["model"] for d in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    ds = reward_dataset(1000)
    full = train_reward_model(ds, FAST, tmp_path / "a", seed=5, progress=False, device="cpu")
    # Pre-empted at step 20 (mid-epoch: 13 steps per epoch), then restarted to the end.
    part = train_reward_model(ds, FAST, tmp_path / "b", seed=5, progress=False, device="cpu",
                              stop_at=20)
    assert part == {"steps": 20, "interrupted": True}
    assert not (tmp_path / "b" / "model.pt").exists()
    torch.manual_seed(123)  # the global RNG at restart must not matter
    resumed = train_reward_model(ds, FAST, tmp_path / "b", seed=5, progress=False, device="cpu")
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (pd.read_parquet(tmp_path / d / "metrics.parquet") for d in "ab")
    pd.testing.assert_frame_equal(ma.drop(columns="wall_time_s"), mb.drop(columns="wall_time_s"))
    assert {k: v for k, v in full.items() if k != "wall_time_s"} == \
        {k: v for k, v in resumed.items() if k != "wall_time_s"}
    # Rerunning a finished job is a no-op; a different config in the same folder is refused.
    again = train_reward_model(ds, FAST, tmp_path / "b", seed=5, progress=False, device="cpu")
    assert again["steps"] == 40
    with pytest.raises(ValueError, match="different reward config"):
        train_reward_model(ds, {**FAST, "lr": 1e-2}, tmp_path / "b", seed=5, progress=False,
                           device="cpu")


def test_config_defaults_and_validation_name_the_key():
    cfg = from_dict(RewardModelConfig, {}, where="models.reward")
    assert (cfg.hidden, cfg.lr, cfg.batch_size, cfg.holdout_ratio, cfg.max_holdout,
            cfg.patience) == ([256, 256], 1e-4, 256, 0.2, 5000, 7)
    bad = [({"lr": 0.0}, "models.reward.lr"), ({"hidden": []}, "models.reward.hidden"),
           ({"holdout_ratio": 1.0}, "models.reward.holdout_ratio"),
           ({"early_stopping": False}, "models.reward.train_steps"),
           ({"holdout_ratio": 0.0}, "models.reward.holdout_ratio"),
           ({"batch_size": "big"}, "models.reward.batch_size"),
           ({"hiden": [3]}, "unknown key")]
    for data, match in bad:
        with pytest.raises(ConfigError, match=match):
            from_dict(RewardModelConfig, data, where="models.reward")
    with pytest.raises(ConfigError, match="models.reward.lr"):
        train_reward_model(reward_dataset(100), {"lr": -1.0}, "unused", progress=False)


def test_fixed_steps_without_holdout(tmp_path):
    ds = reward_dataset(500)
    cfg = {**FAST, "holdout_ratio": 0.0, "early_stopping": False}
    summary = train_reward_model(ds, cfg, tmp_path, seed=0, progress=False, device="cpu")
    assert summary["steps"] == 40 and summary["holdout_size"] == 0
    assert not summary["early_stopped"]
    m = pd.read_parquet(tmp_path / "metrics.parquet")
    assert m["holdout_mse"].isna().all() and len(m) == 4


def test_load_roundtrip_and_missing(tmp_path):
    ds = reward_dataset(600)
    train_reward_model(ds, FAST, tmp_path, seed=0, progress=False, device="cpu")
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    model = load_reward_model(tmp_path)
    assert isinstance(model, RewardModel) and not model.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state["model"].items())
    obs, act = torch.as_tensor(ds.observations[:7]), torch.as_tensor(ds.actions[:7])
    # Raw units: output = standardised net output mapped back with the reward statistics.
    z = model.net(model.inputs(torch.cat([obs, act], -1)))[:, 0]
    assert torch.allclose(model(obs, act), z * model.r_std + model.r_mean)
    assert float(model.r_mean) == pytest.approx(float(ds.rewards.mean()), abs=0.2)
    with pytest.raises(FileNotFoundError, match="train-model --model reward"):
        load_reward_model(tmp_path / "nothing")
