"""MOPO / MBPO rollout generators: penalty formulas, termination, output layout, seeding and
resume, make_generator errors, and a few steps of the real offline loop with SAC."""
import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from baselines import mopo
from baselines.ensemble import train_ensemble
from baselines.mopo import (PAPER_SETTINGS, PRESETS, MOPOConfig, grid_settings, paper_settings,
                           uncertainty_penalty)
from harness import registry
from harness.config import ConfigError, from_dict
from harness.data.dataset import Dataset
from harness.envs import hopper_termination
from harness.training.offline_loop import OfflineConfig, offline_loop
from agents.sac import SAC, SACConfig

TINY = [32, 32]
ENSEMBLE = dict(num_members=4, num_elites=2, hidden=[64, 64], weight_decay=[0.0, 0.0, 0.0],
                max_epochs=3)


@pytest.fixture(scope="module")
def ensemble_dir(hopper_random, tmp_path_factory):
    out = tmp_path_factory.mktemp("hopper_ensemble")
    train_ensemble(hopper_random, ENSEMBLE, out, seed=0, progress=False, device="cpu")
    return out


@pytest.fixture
def agent(hopper_random):
    torch.manual_seed(0)
    return SAC(hopper_random.obs_dim, hopper_random.act_dim, SACConfig(hidden=TINY))


class mbpo:  # noqa: N801 -- the registry's MBPO: MOPO's generator with its pinned settings
    @staticmethod
    def make_generator(dataset, cfg, model_dirs, device="cpu", seed=None):
        pinned = registry.method("mbpo").pinned_rollout
        return mopo.make_generator(dataset, {**cfg, **pinned}, model_dirs, device, seed)


def generator(module, hopper_random, ensemble_dir, seed=0, **cfg):
    return module.make_generator(hopper_random, cfg, {"ensemble": ensemble_dir}, "cpu", seed)


def half_fallen(ds, n=200):
    """n dataset states; the second half is fallen far past Hopper's healthy range
    (height 0.2 < 0.7, angle 0.8 > 0.2), so one model step cannot bring it back."""
    obs = torch.as_tensor(ds.observations[:n]).clone()
    obs[n // 2:, 0], obs[n // 2:, 1] = 0.2, 0.8
    return obs


# ---- config -----------------------------------------------------------------------------------

def test_config_defaults_and_validation():
    cfg = from_dict(MOPOConfig, {})
    assert (cfg.rollout_length, cfg.penalty_coef, cfg.penalty, cfg.rollout_batch_size,
            cfg.deterministic) == (5, 1.0, "aleatoric", 50_000, False)
    for bad, key in (({"rollout_length": -1}, "policy.rollout.rollout_length"),
                     ({"rollout_length": 0}, "policy.rollout.rollout_length"),
                     ({"penalty_coef": -0.1}, "policy.rollout.penalty_coef"),
                     ({"rollout_batch_size": 0}, "policy.rollout.rollout_batch_size"),
                     ({"penalty": "epistemic"}, "policy.rollout.penalty"),
                     ({"horizon": 5}, "unknown key(s) ['horizon']")):
        with pytest.raises(ConfigError) as err:
            from_dict(MOPOConfig, bad, where="policy.rollout")
        assert key in str(err.value)


def test_mopo_presets_from_the_reference_settings_file():
    tasks = {f"{f}-{k}" for f in ("hopper", "halfcheetah", "walker2d")
             for k in ("random", "medium", "medium-replay", "medium-expert")}
    assert PAPER_SETTINGS is PRESETS["mopo-authors"] and set(PAPER_SETTINGS) == tasks
    assert set(PRESETS["offlinerl-kit"]) == {t for t in tasks if not t.endswith("-random")}
    for preset in PRESETS.values():
        for task, s in preset.items():
            from_dict(MOPOConfig, s, where=task)  # every entry is a valid config
    assert paper_settings("hopper-medium-v2") == {"rollout_length": 5, "penalty_coef": 5.0}
    assert paper_settings("walker2d-medium-replay") == {"rollout_length": 1,
                                                        "penalty_coef": 1.0}
    assert paper_settings("hopper-medium-replay-v2", "offlinerl-kit") == {
        "rollout_length": 5, "penalty_coef": 2.5}
    assert grid_settings("halfcheetah-random") == ("mopo-authors", PAPER_SETTINGS[
        "halfcheetah-random"])
    with pytest.raises(KeyError, match="ant-medium"):
        paper_settings("ant-medium")
    with pytest.raises(KeyError, match="offlinerl-kit MOPO settings for 'hopper-random'"):
        paper_settings("hopper-random", "offlinerl-kit")


# ---- penalty ----------------------------------------------------------------------------------

def test_penalty_formulas_on_hand_made_predictions():
    # E = 3 members, N = 2 samples, D = 2 outputs
    stds = torch.tensor([[[3.0, 4.0], [1.0, 0.0]],
                         [[0.0, 1.0], [0.0, 2.0]],
                         [[1.0, 1.0], [6.0, 8.0]]])
    means = torch.tensor([[[0.0, 0.0], [1.0, 1.0]],
                          [[3.0, 0.0], [1.0, 1.0]],
                          [[0.0, 0.0], [1.0, 4.0]]])
    al = uncertainty_penalty(means, stds, "aleatoric")
    assert torch.allclose(al, torch.tensor([5.0, 10.0]))  # max_e ||std_e||: 5 (e0), 10 (e2)
    es = uncertainty_penalty(means, stds, "ensemble_std")
    # sample 0: dim 0 over members (0, 3, 0) -> std sqrt(2); dim 1 constant -> 0
    # sample 1: dim 0 constant; dim 1 over (1, 1, 4) -> std sqrt(2)
    assert torch.allclose(es, torch.tensor([math.sqrt(2.0), math.sqrt(2.0)]))
    assert torch.equal(uncertainty_penalty(means, stds, "none"), torch.zeros(2))
    with pytest.raises(ValueError, match="penalty must be"):
        uncertainty_penalty(means, stds, "max")


# ---- generate ---------------------------------------------------------------------------------

def test_generate_layout_and_termination(hopper_random, ensemble_dir, agent):
    gen = generator(mopo, hopper_random, ensemble_dir, rollout_length=3, rollout_batch_size=150)
    assert gen.max_transitions_per_call == 450
    start = half_fallen(hopper_random)  # 200 > rollout_batch_size: only the first 150 are used
    out = gen.generate(agent, start)
    m = len(out["obs"])
    o, a = hopper_random.obs_dim, hopper_random.act_dim
    assert out["obs"].shape == out["next_obs"].shape == (m, o)
    assert out["actions"].shape == (m, a) and out["rewards"].shape == (m,)
    assert out["terminals"].shape == (m,) and set(out["terminals"].unique().tolist()) <= {0, 1}
    assert 150 < m <= gen.max_transitions_per_call
    assert (out["actions"].abs() <= 1).all()
    for key in ("penalty_mean", "raw_reward_mean", "reward_mean", "terminal_frac",
                "mean_length"):
        assert isinstance(out[key], float)
    # terminal flags are the task's termination function of next_obs
    assert torch.equal(out["terminals"].bool(), hopper_termination(out["next_obs"]))
    # step 1 covers all 150 starts; step 2 continues exactly the non-terminated ones
    assert torch.equal(out["obs"][:150], start[:150])
    done1 = out["terminals"][:150].bool()
    assert done1[100:].all() and done1.sum() < 150  # fallen starts stop after one step
    alive = int((~done1).sum())
    assert torch.equal(out["obs"][150:150 + alive], out["next_obs"][:150][~done1])
    assert out["terminal_frac"] == pytest.approx(float(out["terminals"].sum()) / 150)
    assert out["mean_length"] == pytest.approx(m / 150)
    # every start fallen: one step each, then the rollout ends early
    fallen = half_fallen(hopper_random)[100:]
    out = gen.generate(agent, fallen)
    assert len(out["obs"]) == 100 and out["terminals"].all() and out["mean_length"] == 1.0


def test_mopo_reward_is_penalised_mbpo_reward(hopper_random, ensemble_dir, agent):
    start = torch.as_tensor(hopper_random.observations[:100])
    lam = 2.5
    runs = {}
    for name, module, kw in (("mopo", mopo, {"penalty_coef": lam}), ("mbpo", mbpo, {}),
                             ("none", mopo, {"penalty": "none", "penalty_coef": 0.0})):
        gen = generator(module, hopper_random, ensemble_dir, seed=5, rollout_length=4,
                        rollout_batch_size=100, **kw)
        torch.manual_seed(11)  # same agent action noise for every run
        runs[name] = gen.generate(agent, start)
    mo, mb, none = runs["mopo"], runs["mbpo"], runs["none"]
    for k in ("obs", "actions", "rewards", "next_obs", "terminals"):
        assert torch.equal(mb[k], none[k])  # MBPO == MOPO with penalty 'none'
        if k != "rewards":
            assert torch.equal(mo[k], mb[k])  # the penalty changes rewards only
    assert mb["penalty_mean"] == 0.0 and mo["penalty_mean"] > 0
    assert mo["raw_reward_mean"] == pytest.approx(mb["reward_mean"], rel=1e-6)
    assert mo["reward_mean"] == pytest.approx(mb["reward_mean"] - lam * mo["penalty_mean"],
                                              rel=1e-5, abs=1e-6)
    assert (mo["rewards"] < mb["rewards"]).all()


def test_seeded_noise_and_state_dict_restore(hopper_random, ensemble_dir, agent):
    start = torch.as_tensor(hopper_random.observations[:64])

    def run(gen):
        torch.manual_seed(1)
        return gen.generate(agent, start)["next_obs"]
    a = generator(mopo, hopper_random, ensemble_dir, seed=3, rollout_batch_size=64)
    b = generator(mopo, hopper_random, ensemble_dir, seed=3, rollout_batch_size=64)
    c = generator(mopo, hopper_random, ensemble_dir, seed=4, rollout_batch_size=64)
    first = run(a)
    assert torch.equal(first, run(b)) and not torch.equal(first, run(c))
    state = a.state_dict()
    second = run(a)
    assert not torch.equal(first, second)  # the stream moved on
    c.load_state_dict(state)
    assert torch.equal(run(c), second)
    # deterministic: each sample is exactly the mean of one (random) elite member
    det = generator(mopo, hopper_random, ensemble_dir, rollout_batch_size=64, rollout_length=1,
                    deterministic=True)
    torch.manual_seed(1)
    out = det.generate(agent, start)
    means, _ = det.dynamics.predict(start, out["actions"])
    match = (means[..., :-1] == out["next_obs"]).all(-1)  # (E, N); rewards are penalised
    assert match.any(0).all()
    assert set(match.float().argmax(0).tolist()) <= set(det.dynamics.elites.tolist())


def test_make_generator_errors(hopper_random, ensemble_dir):
    with pytest.raises(KeyError, match="'ensemble'"):
        mopo.make_generator(hopper_random, {}, {"diffusion": ensemble_dir})
    with pytest.raises(KeyError, match="'ensemble'"):
        mbpo.make_generator(hopper_random, {}, {})
    ds = hopper_random
    short = Dataset(ds.observations[:, :5], ds.actions, ds.rewards, ds.next_observations[:, :5],
                    ds.terminals, ds.timeouts, name=ds.name)
    with pytest.raises(ValueError, match="obs/act dims 11/3.*5/3"):
        mopo.make_generator(short, {}, {"ensemble": ensemble_dir})
    with pytest.raises(ConfigError, match="policy.rollout.rollout_length"):
        mopo.make_generator(ds, {"rollout_length": -1}, {"ensemble": ensemble_dir})
    with pytest.raises(FileNotFoundError):
        mopo.make_generator(ds, {}, {"ensemble": ensemble_dir / "nothing"})


# ---- with the real offline loop ----------------------------------------------------------------

def loop_cfg(**kw):
    base = dict(total_steps=16, batch_size=32, real_ratio=0.5, rollout_freq=4,
                model_retain_epochs=2, eval_every=16, eval_episodes=1,
                log_every=4, checkpoint_every=100)
    return from_dict(OfflineConfig, {**base, **kw}, where="offline")


def run_loop(ds, ensemble_dir, out, method=mopo, stop_at=None):
    torch.manual_seed(0)
    agent = SAC(ds.obs_dim, ds.act_dim, SACConfig(hidden=TINY))
    gen = method.make_generator(ds, {"rollout_length": 3, "rollout_batch_size": 40},
                                {"ensemble": ensemble_dir}, "cpu", seed=0)
    df = offline_loop(agent, ds, loop_cfg(), out, seed=0, generator=gen, progress=False,
                      stop_at=stop_at)
    return agent, df


def test_offline_loop_with_mopo_generator_and_exact_resume(hopper_random, ensemble_dir,
                                                            tmp_path):
    full_agent, full = run_loop(hopper_random, ensemble_dir, tmp_path / "full")
    assert full["step"].tolist() == [4, 8, 12, 16]
    logged = full.dropna(subset=["rollout_penalty_mean"])
    assert len(logged) == 4 and (logged["rollout_penalty_mean"] > 0).all()  # calls 1,5,9,13
    assert {"rollout_raw_reward_mean", "rollout_transitions", "rollout_terminal_frac"} <= set(
        full.columns)
    assert np.isfinite(full["critic_loss"].dropna()).all()
    assert full["normalized_score"].notna().sum() == 1
    # interrupted at step 10, resumed with a fresh generator: the call at step 13 must draw
    # the same model noise (generator state restored from the loop's checkpoint)
    _, part = run_loop(hopper_random, ensemble_dir, tmp_path / "cut", stop_at=10)
    assert part["step"].max() == 8
    resumed_agent, resumed = run_loop(hopper_random, ensemble_dir, tmp_path / "cut")
    cols = [c for c in full.columns if c != "wall_time_s"]
    pd.testing.assert_frame_equal(full[cols], resumed[cols])
    assert all(torch.equal(p, q) for p, q in zip(full_agent.state_dict().values(),
                                                  resumed_agent.state_dict().values()))


def test_offline_loop_with_mbpo_generator(hopper_random, ensemble_dir, tmp_path):
    _, df = run_loop(hopper_random, ensemble_dir, tmp_path, method=mbpo)
    assert (df["rollout_penalty_mean"].dropna() == 0).all()
    assert df["rollout_transitions"].dropna().gt(40).all()


def test_registry_resolves_mopo_and_mbpo_to_one_generator():
    for name in ("mopo", "mbpo"):
        assert registry.resolve(registry.method(name).generator) is mopo.make_generator
    assert registry.method("mbpo").pinned_rollout == {"penalty": "none", "penalty_coef": 0.0}
    assert dataclasses.is_dataclass(MOPOConfig)
