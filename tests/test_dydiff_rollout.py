"""DyDiff rollouts: policy injection, truncation at terminals, trajectory filter, generator."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from harness.config import ConfigError, from_dict
from dydiff.segments import Normalizer
from dydiff.sampler import DiffusionDynamics, SamplerConfig
from dydiff.diffusion import load_diffusion, train_diffusion
from harness.envs import termination_fn
from agents.sac import SAC
from dydiff.rollout import (DyDiffConfig, DyDiffGenerator, _reward_fn, alive_mask,
                            dataset_limits, filter_trajectories, make_generator, n_kept)


# --- filter -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n,fraction,k", [(10, 0.6, 6), (7, 0.6, 4), (3, 0.1, 1), (5, 1.0, 5)])
def test_filter_keeps_exact_fraction(n, fraction, k):
    returns = torch.randn(n)
    for kind in ("hardmax", "softmax"):
        idx = filter_trajectories(returns, fraction, kind, 0.05)
        assert len(idx) == k == n_kept(n, fraction) and len(set(idx.tolist())) == k


def test_hardmax_keeps_top_returns():
    returns = torch.randperm(50).float()
    idx = filter_trajectories(returns, 0.6, "hardmax")
    assert set(returns[idx].tolist()) == set(range(20, 50))


def test_softmax_prefers_high_returns_and_temperature_matters():
    torch.manual_seed(0)
    returns = torch.arange(100).float()
    kept = torch.zeros(100)
    for _ in range(200):
        kept[filter_trajectories(returns, 0.5, "softmax", 0.05)] += 1
    assert kept[90:].mean() > 195 and kept[:10].mean() < 5  # nearly top-k at temp 0.05
    hot = torch.zeros(100)
    for _ in range(200):
        hot[filter_trajectories(returns, 0.5, "softmax", 1.0)] += 1
    # A higher temperature keeps low-return trajectories too, still preferring high returns.
    assert 20 < hot[:10].mean() < hot[90:].mean() < 195
    with pytest.raises(ValueError, match="filter must be"):
        filter_trajectories(returns, 0.5, "argmax")


def test_alive_mask_truncates_after_first_terminal():
    done = torch.tensor([[0, 0, 1, 0, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert alive_mask(done).int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1],
                                               [1, 0, 0, 0, 0]]


# --- policy injection with an exact dynamics oracle --------------------------------------------

class LinearDynamicsOracle(nn.Module):
    """Exact denoiser of a deterministic system: states = rollout of s' = 0.9 s + 0.3 [a, a0]
    from the first state with the input's actions; actions = a behaviour policy tanh(s Kb)."""

    def __init__(self):
        super().__init__()
        self.Kb = torch.randn(3, 2, generator=torch.Generator().manual_seed(5))

    @staticmethod
    def rollout(s0, actions):
        states = [s0]
        for t in range(actions.shape[1] - 1):  # a recurrence: inherently sequential
            a = actions[:, t]
            states.append(0.9 * states[-1] + 0.3 * torch.cat([a, a[:, :1]], -1))
        return torch.stack(states, 1)

    def forward(self, x, sigma):
        return torch.cat([self.rollout(x[:, 0, :3], x[:, :, 3:]),
                          torch.tanh(x[:, :, :3] @ self.Kb)], -1)


class LinearPolicy:
    """Stand-in agent (deterministic tanh-linear policy) with the agent `act` interface."""

    def __init__(self):
        self.K = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
        self.calls = []

    def act(self, obs, deterministic=True):
        assert deterministic and obs.ndim == 2
        self.calls.append(obs.shape[0])
        return torch.tanh(obs @ self.K)


def _oracle_dynamics(horizon=10):
    norm = Normalizer("limits", np.zeros(5, np.float32), np.ones(5, np.float32))
    return DiffusionDynamics(LinearDynamicsOracle(), norm, 3, 2, horizon,
                             SamplerConfig(num_steps=8))


def test_injection_iterations_move_actions_towards_the_policy():
    dyn, agent = _oracle_dynamics(), LinearPolicy()
    start = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    one = dyn.inject(start, agent, iterative_times=1, average_states=False)
    torch.manual_seed(0)
    two = dyn.inject(start, agent, iterative_times=2, average_states=False)
    # One batched policy call over all N * H generated states per iteration (+ init).
    assert agent.calls[:2] == [64 * 10, 64 * 10]
    # The iterations share their prefix; the second pass moves states and actions further.
    assert two["action_gap"][:2] == one["action_gap"]
    assert not torch.allclose(one["states"], two["states"])
    g0, g1, g2 = two["action_gap"]
    assert g2 < g1 < g0  # ||a_cond - pi(s_gen)|| shrinks with every injection
    # Without averaging the states are exactly the dynamics under the conditioning actions,
    # and the returned actions are the policy's on those states.
    assert torch.allclose(two["states"], LinearDynamicsOracle.rollout(start, two["cond_actions"]),
                          atol=1e-5)
    assert torch.equal(two["actions"], torch.tanh(two["states"] @ agent.K))
    # Authors' state averaging: still far closer to the policy than the behaviour actions.
    torch.manual_seed(0)
    avg = dyn.inject(start, agent, iterative_times=2, average_states=True)
    assert max(avg["action_gap"][1:]) < 0.2 * avg["action_gap"][0]


def test_policy_rollout_and_open_loop_on_the_oracle():
    dyn, agent = _oracle_dynamics(horizon=6), LinearPolicy()
    start = torch.randn(4, 3)
    out = dyn.policy_rollout(start, agent, 12)  # 12 transitions = 3 windows of 5
    assert out["obs"].shape == (4, 12, 3) and out["next_obs"].shape == (4, 12, 3)
    assert torch.equal(out["obs"][:, 1:], out["next_obs"][:, :-1])  # contiguous windows
    assert torch.equal(out["obs"][:, 0], start)
    actions = torch.rand(4, 12, 2) * 2 - 1
    nxt = dyn.open_loop(start, actions)
    truth = LinearDynamicsOracle.rollout(start, torch.cat([actions, actions[:, :1]], 1))
    assert torch.allclose(nxt, truth[:, 1:], atol=1e-5)  # chained windows are exact


# --- generator ---------------------------------------------------------------------------------

class RewardStandIn(nn.Module):
    """Stand-in for dydiff.reward_model (a colleague's): r(s, a) = s_0 - 0.1 |a|^2."""

    def forward(self, obs, act):
        return (obs[:, 0] - 0.1 * (act ** 2).sum(-1))[:, None]


TINY_DIFFUSION = {"horizon": 8, "dim": 16, "dim_mults": [1, 2], "batch_size": 32,
                  "train_steps": 30, "lr_rampup_kimg": 0.0, "log_every": 10,
                  "checkpoint_every": 30, "sampler": {"num_steps": 4},
                  # action dropout, so that init 'diffusion' can sample action-free (the
                  # authors' 1.0 cannot, dydiff/rollout.py make_generator)
                  "action_cond_prob": 0.9}
# Seconds to train (tests/test_mopo.py's ensemble): 4 members, 2 elites, 64 x 64, 3 epochs.
TINY_ENSEMBLE = dict(num_members=4, num_elites=2, hidden=[64, 64],
                     weight_decay=[0.0, 0.0, 0.0], max_epochs=3)


@pytest.fixture(scope="module")
def hopper_diffusion(hopper_random, tmp_path_factory):
    out = tmp_path_factory.mktemp("diffusion")
    train_diffusion(hopper_random, TINY_DIFFUSION, out, seed=0, progress=False, device="cpu")
    return out


@pytest.fixture(scope="module")
def hopper_ensemble(hopper_random, tmp_path_factory):
    """DyDiff's start-state ensemble (the authors' recipe, ensemble-dydiff), tiny."""
    from baselines.ensemble import DyDiffEnsembleConfig, train_ensemble  # any layer, in tests
    out = tmp_path_factory.mktemp("ensemble-dydiff")
    train_ensemble(hopper_random, from_dict(DyDiffEnsembleConfig, TINY_ENSEMBLE), out, seed=0,
                   progress=False, device="cpu")
    return out


def test_generator_outputs_truncated_filtered_transitions(hopper_random, hopper_diffusion):
    torch.manual_seed(0)
    agent = SAC(11, 3)
    # The diffusion-only start (the pre-ensemble default), so no ensemble is needed here.
    cfg = from_dict(DyDiffConfig, {"rollout_batch_size": 20, "filter": "hardmax",
                                   "init": "diffusion"})
    limits = dataset_limits(hopper_random)
    gen = DyDiffGenerator(load_diffusion(hopper_diffusion), _reward_fn(RewardStandIn()),
                          termination_fn("hopper"), cfg, limits=limits)
    assert gen.length == 7 and gen.max_transitions_per_call == 12 * 7
    start = torch.as_tensor(hopper_random.observations[:30])
    torch.manual_seed(1)
    out = gen.generate(agent, start)
    m = len(out["obs"])
    assert 12 <= m <= gen.max_transitions_per_call
    assert out["actions"].shape == (m, 3) and out["next_obs"].shape == (m, 11)
    assert out["rewards"].shape == (m,) and out["terminals"].shape == (m,)
    assert torch.allclose(out["rewards"], RewardStandIn()(out["obs"], out["actions"])[:, 0])
    # Terminal flags are the task's termination function; at most one per kept trajectory.
    done = termination_fn("hopper")(out["next_obs"])
    assert torch.equal(out["terminals"].bool(), done)
    assert out["terminals"].sum() <= 12
    # Stored actions: the policy's on the (clipped) stored states, clipped to the data range.
    assert torch.equal(out["actions"], limits.act(agent.act(out["obs"], deterministic=True)))
    assert out["action_gap_after"] < out["action_gap_before"]
    # Same seed -> same rollouts.
    torch.manual_seed(1)
    out2 = gen.generate(agent, start)
    assert all(torch.equal(out[k], out2[k]) for k in ("obs", "actions", "rewards", "terminals"))


def test_make_generator_errors(hopper_random, hopper_diffusion, tmp_path):
    with pytest.raises(KeyError, match="reward"):
        make_generator(hopper_random, {}, {"diffusion": hopper_diffusion}, "cpu")
    # The default (authors') start needs the ensemble, and says so.
    with pytest.raises(KeyError, match=r"\['ensemble-dydiff'\].*not MOPO's 'ensemble'.*"
                                       r"init 'diffusion' or 'policy'"):
        make_generator(hopper_random, {}, {"diffusion": hopper_diffusion, "reward": tmp_path},
                       "cpu")
    with pytest.raises(ConfigError, match="policy.rollout.threshold"):
        make_generator(hopper_random, {"threshold": 0.0}, {}, "cpu")
    with pytest.raises(FileNotFoundError, match="train-model --model diffusion"):
        load_diffusion(tmp_path)


def test_make_generator_with_trained_reward_model_end_to_end(hopper_random, hopper_diffusion,
                                                             hopper_ensemble, tmp_path):
    from dydiff.reward_model import load_reward_model, train_reward_model
    train_reward_model(hopper_random, {"hidden": [32, 32], "lr": 1e-3, "eval_every": 10,
                                       "train_steps": 30}, tmp_path, seed=0, progress=False,
                       device="cpu")
    # Defaults: the authors' ensemble start, clipping and all-rows score.
    gen = make_generator(hopper_random, {"rollout_batch_size": 16, "sampler_steps": 3},
                         {"diffusion": hopper_diffusion, "reward": tmp_path,
                          "ensemble-dydiff": hopper_ensemble}, "cpu")
    assert gen.dynamics.sampler.num_steps == 3 and gen.length == 7
    assert gen.ensemble is not None and gen.limits is not None
    torch.manual_seed(0)
    agent = SAC(11, 3)
    torch.manual_seed(1)
    out = gen.generate(agent, torch.as_tensor(hopper_random.observations[:16]))
    torch.manual_seed(1)
    again = gen.generate(agent, torch.as_tensor(hopper_random.observations[:16]))
    assert all(torch.equal(out[k], again[k]) for k in ("obs", "actions", "rewards",
                                                       "next_obs", "terminals"))
    m = len(out["obs"])
    assert n_kept(16, 0.6) <= m <= gen.max_transitions_per_call
    assert out["next_obs"].shape == (m, 11) and out["rewards"].shape == (m,)
    assert torch.isfinite(out["rewards"]).all() and torch.isfinite(out["next_obs"]).all()
    # Rewards are the trained model's r(s, a) on the generated transitions, in raw units.
    reward = load_reward_model(tmp_path)
    assert torch.allclose(out["rewards"], reward(out["obs"], out["actions"]))
