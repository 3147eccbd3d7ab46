"""DyDiff rollouts as the authors' code does them (docs/fidelity/dydiff-authors-code.md):
the injection loop starts from the ensemble's policy rollout (`init`), states and actions are
clipped to the dataset's range (`clip`), and trajectories are scored over all rows (`score`);
each option changes exactly what it names."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from agents.sac import SAC, SACConfig
from dydiff.diffusion import load_diffusion, train_diffusion
from dydiff.rollout import (DyDiffConfig, DyDiffGenerator, _reward_fn, dataset_limits,
                            filter_trajectories, make_generator, trajectory_scores)
from dydiff.sampler import Limits, ensemble_rollout
from harness import registry
from harness.config import ConfigError, from_dict
from harness.data.dataset import Dataset
from test_dydiff_rollout import (TINY_DIFFUSION, TINY_ENSEMBLE, LinearDynamicsOracle,
                                 LinearPolicy, RewardStandIn, _oracle_dynamics)


def never_done(next_obs):
    return torch.zeros(next_obs.shape[:-1], dtype=torch.bool, device=next_obs.device)


class DriftingEnsemble:
    """Stand-in for EnsembleDynamics.mean_step on the oracle's 3-d states and 2-d actions:
    s' = 0.9 s + 0.3 [a, a_0] + drift (drifts out of any bounded range); records its inputs."""

    obs_dim, act_dim = 3, 2

    def __init__(self, drift: float = 0.7):
        self.drift, self.inputs = drift, []

    def mean_step(self, obs, act):
        self.inputs.append((obs.clone(), act.clone()))
        return 0.9 * obs + 0.3 * torch.cat([act, act[:, :1]], -1) + self.drift, obs[:, 0]

    def elite_step(self, obs, act, generator=None):  # one "elite": the same step
        return self.mean_step(obs, act)[0]


class RecordingPolicy(LinearPolicy):
    """LinearPolicy (scaled so its actions leave [-0.2, 0.2]) that records the states it sees."""

    def __init__(self):
        super().__init__()
        self.K = 3 * self.K
        self.seen = []

    def act(self, obs, deterministic=True):
        self.seen.append(obs.clone())
        return super().act(obs, deterministic)


class ConstantPolicy:
    """Ignores the state: clipping the states it sees cannot change its actions."""

    def act(self, obs, deterministic=True):
        return torch.tensor([0.9, -0.4]).expand(obs.shape[0], 2).clone()


NARROW = Limits(torch.full((3,), -1.0), torch.full((3,), 1.0), torch.full((2,), -0.2),
                torch.full((2,), 0.2))


def inside(x, lo, hi):
    return bool(((x >= lo) & (x <= hi)).all())


# --- config -------------------------------------------------------------------------------------

def test_defaults_are_the_authors_and_new_values_are_validated():
    cfg = from_dict(DyDiffConfig, {})
    assert (cfg.init, cfg.clip, cfg.score, cfg.iterative_times) == ("ensemble", True,
                                                                    "all_rows", 2)
    for key, bad in (("init", "model"), ("score", "alive"), ("filter", "top"),
                     ("clip", "yes")):
        with pytest.raises(ConfigError, match=f"policy.rollout.{key}"):
            from_dict(DyDiffConfig, {key: bad}, where="policy.rollout")
    for ok in ({"init": "diffusion"}, {"init": "policy"}, {"score": "alive_rows"},
               {"filter": "none"}, {"clip": False}):
        from_dict(DyDiffConfig, ok)


def test_dataset_limits_cover_observations_next_observations_and_actions():
    """The former box (clip_range: with_next_obs); the authors' (the normaliser's range, the
    default) is in tests/test_dydiff_deviations.py."""
    obs = np.array([[0.0, 1.0], [2.0, -1.0]], np.float32)
    nxt = np.array([[5.0, 0.0], [1.0, -3.0]], np.float32)
    act = np.array([[0.5], [-0.25]], np.float32)
    z = np.zeros(2, bool)
    lim = dataset_limits(Dataset(obs, act, np.zeros(2, np.float32), nxt, z, z, name="hopper"),
                         next_obs=True)
    assert lim.obs_lo.tolist() == [0.0, -3.0] and lim.obs_hi.tolist() == [5.0, 1.0]
    assert lim.act_lo.tolist() == [-0.25] and lim.act_hi.tolist() == [0.5]
    x = torch.tensor([[-1.0, 2.0], [3.0, -4.0]])
    assert lim.obs(x).tolist() == [[0.0, 1.0], [3.0, -3.0]]  # per dimension, in-range kept


# --- init: the ensemble's closed-loop policy rollout, then K injection iterations ---------------

def test_ensemble_init_is_the_closed_loop_rollout_then_the_same_injection_loop():
    dyn, agent, ens = _oracle_dynamics(horizon=6), LinearPolicy(), DriftingEnsemble()
    start = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    # By hand: H - 1 = 5 ensemble steps with a_i = pi(s_i), then a_5 = pi(s_5).
    s, states, acts = start, [start], []
    for _ in range(5):
        a = torch.tanh(s @ agent.K)
        s = 0.9 * s + 0.3 * torch.cat([a, a[:, :1]], -1) + ens.drift
        states.append(s)
        acts.append(a)
    acts.append(torch.tanh(s @ agent.K))
    states, acts = torch.stack(states, 1), torch.stack(acts, 1)
    k0 = dyn.inject(start, agent, iterative_times=0, init="ensemble", ensemble=ens)
    assert torch.allclose(k0["states"], states, atol=1e-6)
    assert torch.allclose(k0["actions"], acts, atol=1e-6)
    assert k0["action_gap"] == [0.0]  # s^0 is generated with the policy's own actions
    # One iteration: s^1 = (DM(s_0, a^0) + s^0) / 2, a^1 = pi(s^1) (generate_rl.py:112-119);
    # the oracle's DM is the exact linear rollout under the conditioning actions.
    torch.manual_seed(0)
    k1 = dyn.inject(start, agent, iterative_times=1, init="ensemble", ensemble=ens)
    want = (LinearDynamicsOracle.rollout(start, k0["actions"]) + k0["states"]) / 2
    assert torch.allclose(k1["states"], want, atol=1e-5)
    assert torch.equal(k1["cond_actions"], k0["actions"])
    assert torch.equal(k1["actions"], torch.tanh(k1["states"] @ agent.K))
    with pytest.raises(ValueError, match="init='ensemble' needs"):
        dyn.inject(start, agent, 0, init="ensemble")
    with pytest.raises(ValueError, match="init must be"):
        dyn.inject(start, agent, 0, init="ensembel", ensemble=ens)


# --- clipping ------------------------------------------------------------------------------------

def test_policy_and_ensemble_see_clipped_inputs_and_stored_rows_are_clipped():
    dyn = _oracle_dynamics(horizon=6)
    start = 3.0 + torch.randn(4, 3, generator=torch.Generator().manual_seed(3))  # far outside
    seen = {}
    for clip in (True, False):
        agent, ens = RecordingPolicy(), DriftingEnsemble()
        torch.manual_seed(0)
        out = dyn.policy_rollout(start, agent, 8, iterative_times=1, init="ensemble",
                                 limits=NARROW if clip else None, ensemble=ens)
        ens_obs = torch.cat([o for o, _ in ens.inputs])
        ens_act = torch.cat([a for _, a in ens.inputs])
        seen[clip] = (torch.cat(agent.seen), ens_obs, ens_act, out)
    pol, ens_obs, ens_act, out = seen[True]
    lo, hi, alo, ahi = NARROW.obs_lo, NARROW.obs_hi, NARROW.act_lo, NARROW.act_hi
    assert inside(pol, lo, hi) and inside(ens_obs, lo, hi) and inside(ens_act, alo, ahi)
    # Stored rows are clipped, except the first obs: the real start state, unchanged.
    assert torch.equal(out["obs"][:, 0], start)
    assert inside(out["obs"][:, 1:], lo, hi) and inside(out["next_obs"], lo, hi)
    assert inside(out["actions"], alo, ahi) and inside(out["last_action"], alo, ahi)
    assert torch.equal(out["obs"][:, 1:], out["next_obs"][:, :-1])  # chained at the clip
    assert torch.equal(out["last_obs"], out["next_obs"][:, -1])
    # Without clipping the same rollout leaves the range everywhere it is checked above.
    pol, ens_obs, ens_act, out = seen[False]
    assert not inside(pol, lo, hi) and not inside(ens_obs, lo, hi)
    assert not inside(ens_act, alo, ahi)
    assert not inside(out["next_obs"], lo, hi) and not inside(out["actions"], alo, ahi)


def test_clip_changes_only_the_out_of_range_values():
    """With a state-blind policy and the diffusion start, clipping can only act on the final
    model -> env conversion: the clipped rollout is the unclipped one, clamped."""
    dyn, agent = _oracle_dynamics(horizon=6), ConstantPolicy()
    start = torch.randn(6, 3, generator=torch.Generator().manual_seed(4))
    runs = {}
    for clip in (True, False):
        torch.manual_seed(0)
        runs[clip] = dyn.policy_rollout(start, agent, 5, iterative_times=1, init="diffusion",
                                        limits=NARROW if clip else None)
    on, off = runs[True], runs[False]
    assert not inside(off["next_obs"], NARROW.obs_lo, NARROW.obs_hi)  # something to clip
    assert not inside(off["actions"], NARROW.act_lo, NARROW.act_hi)
    assert torch.equal(on["obs"][:, 0], off["obs"][:, 0])
    assert torch.equal(on["next_obs"], NARROW.obs(off["next_obs"]))
    assert torch.equal(on["obs"][:, 1:], NARROW.obs(off["obs"][:, 1:]))
    assert torch.equal(on["actions"], NARROW.act(off["actions"]))
    assert on["action_gap"] == off["action_gap"]


# --- score and filter ---------------------------------------------------------------------------

# Hand-made batch: 3 trajectories of T = 4 transitions on 1-d states, reward r(s, a) = s.
# traj 0: s = 1 throughout;           all rows 5,   alive rows 4
# traj 1: falls at once (s_1 = 200 > 100 is terminal) but the later rows are rewarding;
#                                     all rows 232, alive rows 2
# traj 2: s = 1.5 throughout;         all rows 7.5, alive rows 6
STATES = torch.tensor([[1.0] * 5, [2.0, 200.0, 10.0, 10.0, 10.0], [1.5] * 5])[..., None]
DONE = STATES[:, 1:, 0] > 100


def test_authors_score_counts_every_row_and_keeps_another_trajectory():
    rewards, last = STATES[:, :-1, 0], STATES[:, -1, 0]
    authors = trajectory_scores(rewards, DONE, last, "all_rows")
    ours = trajectory_scores(rewards, DONE, last, "alive_rows")
    assert authors.tolist() == [5.0, 232.0, 7.5] and ours.tolist() == [4.0, 2.0, 6.0]
    assert filter_trajectories(authors, 1 / 3, "hardmax").tolist() == [1]
    assert filter_trajectories(ours, 1 / 3, "hardmax").tolist() == [2]
    assert filter_trajectories(authors, 1 / 3, "none").tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="score must be"):
        trajectory_scores(rewards, DONE, last, "alive")


class FixedDynamics:
    """A 'diffusion model' that returns the hand-made batch whatever it is asked."""

    horizon, device = 5, torch.device("cpu")

    def policy_rollout(self, start, agent, H, *args, **kwargs):
        zeros = torch.zeros_like(STATES)
        return {"obs": STATES[:, :-1], "actions": zeros[:, :-1], "next_obs": STATES[:, 1:],
                "last_obs": STATES[:, -1], "last_action": zeros[:, -1], "action_gap": [0.0]}


def _fixed_generator(**cfg):
    cfg = from_dict(DyDiffConfig, {"init": "diffusion", "clip": False, "threshold": 1 / 3,
                                   "rollout_batch_size": 3, **cfg})
    return DyDiffGenerator(FixedDynamics(), lambda s, a: s[:, 0], lambda nxt: nxt[..., 0] > 100,
                           cfg)


def test_score_changes_only_the_kept_trajectories():
    start = torch.zeros(3, 1)
    run = lambda **cfg: _fixed_generator(**cfg).generate(None, start)  # noqa: E731
    authors, ours = run(filter="hardmax"), run(filter="hardmax", score="alive_rows")
    # Authors: the early-terminating trajectory 1; stored up to its terminal only.
    assert authors["obs"].tolist() == [[2.0]] and authors["terminals"].tolist() == [1.0]
    assert authors["next_obs"].tolist() == [[200.0]] and authors["rewards"].tolist() == [2.0]
    assert ours["obs"].tolist() == [[1.5]] * 4 and ours["terminals"].tolist() == [0.0] * 4
    # Without a filter the score changes nothing that is stored.
    a, b = run(filter="none"), run(filter="none", score="alive_rows")
    for key in ("obs", "actions", "rewards", "next_obs", "terminals"):
        assert torch.equal(a[key], b[key])
    # filter none keeps every trajectory (in order), truncated at its terminal.
    assert a["obs"][:, 0].tolist() == [1.0] * 4 + [2.0] + [1.5] * 4
    assert _fixed_generator(filter="none").max_transitions_per_call == 3 * 4
    assert _fixed_generator(filter="hardmax").max_transitions_per_call == 1 * 4


# --- with trained models ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(hopper_random, tmp_path_factory):
    from baselines.ensemble import DyDiffEnsembleConfig, train_ensemble
    from dydiff.reward_model import train_reward_model
    dirs = {k: tmp_path_factory.mktemp(k)
            for k in ("diffusion", "ensemble", "ensemble-dydiff", "reward")}
    train_diffusion(hopper_random, TINY_DIFFUSION, dirs["diffusion"], seed=0, progress=False,
                    device="cpu")
    # MOPO's ensemble (the rollout-error study's) and DyDiff's start-state one.
    train_ensemble(hopper_random, TINY_ENSEMBLE, dirs["ensemble"], seed=0, progress=False,
                   device="cpu")
    train_ensemble(hopper_random, from_dict(DyDiffEnsembleConfig, TINY_ENSEMBLE),
                   dirs["ensemble-dydiff"], seed=0, progress=False, device="cpu")
    train_reward_model(hopper_random, {"hidden": [32, 32], "lr": 1e-3, "eval_every": 10,
                                       "train_steps": 30}, dirs["reward"], seed=0,
                       progress=False, device="cpu")
    return dirs


@pytest.fixture
def agent():
    torch.manual_seed(0)
    return SAC(11, 3, SACConfig(hidden=[32, 32]))


@pytest.mark.parametrize("length", [-1, 14])  # one window of H - 1 = 7; two chained windows
def test_without_injection_the_generator_returns_the_ensemble_policy_rollout(
        hopper_random, models, agent, length):
    ensemble = registry.load_model("ensemble-dydiff", models["ensemble-dydiff"])
    start = torch.as_tensor(hopper_random.observations[:12])

    def generate(**cfg):
        cfg = from_dict(DyDiffConfig, {"rollout_batch_size": 12, "rollout_length": length,
                                       "filter": "none", "clip": False,
                                       "start_step": "elite_mean", **cfg})
        gen = DyDiffGenerator(load_diffusion(models["diffusion"]), _reward_fn(RewardStandIn()),
                              never_done, cfg, ensemble=ensemble)
        torch.manual_seed(0)
        return gen, gen.generate(agent, start)

    gen, out = generate(iterative_times=0)
    ref = ensemble.policy_rollout(start, agent, gen.length)
    flat = lambda x: x.reshape(12 * gen.length, -1)  # noqa: E731
    for key in ("obs", "actions", "next_obs"):
        assert torch.equal(out[key], flat(ref[key])), key
    assert torch.equal(out["rewards"], RewardStandIn()(out["obs"], out["actions"])[:, 0])
    # The check has teeth: the diffusion start, or an injection iteration, changes the states.
    for other in ({"iterative_times": 0, "init": "diffusion"}, {"iterative_times": 1}):
        assert not torch.allclose(generate(**other)[1]["next_obs"], flat(ref["next_obs"]))


def test_the_ensemble_start_steps_one_random_elite_per_sample(hopper_random, models, agent):
    """start_step random_elite (the authors', the default): each next state of the start
    trajectory is the mean of one elite at its (state, action), drawn per sample and step;
    elite_mean averages the elites instead."""
    ensemble = registry.load_model("ensemble-dydiff", models["ensemble-dydiff"])
    start = torch.as_tensor(hopper_random.observations[:64])
    assert from_dict(DyDiffConfig, {}).start_step == "random_elite"
    states, actions = ensemble_rollout(ensemble, start, agent, 4, None, "random_elite",
                                       torch.Generator().manual_seed(0))
    o, a = ensemble.obs_dim, ensemble.act_dim
    means, _ = ensemble.predict(states[:, :-1].reshape(-1, o), actions[:, :-1].reshape(-1, a))
    gap = (means[ensemble.elites] - states[:, 1:].reshape(-1, o)).abs().amax(-1)  # (elites, N)
    assert (gap.min(0).values < 1e-5).all()  # every next state is one elite's mean ...
    assert len(gap.argmin(0).unique()) == len(ensemble.elites)  # ... and all elites are drawn
    averaged, _ = ensemble_rollout(ensemble, start, agent, 4, None, "elite_mean")
    assert not torch.allclose(averaged, states)


def test_clip_keeps_generated_rows_inside_a_narrow_dataset_range(hopper_random, models, agent):
    """The models are trained on hopper_random; a dataset squeezed to half its range about the
    midpoint makes them produce out-of-range values, which clipping removes."""
    ds = hopper_random
    o_mid = (np.minimum(ds.observations.min(0), ds.next_observations.min(0))
             + np.maximum(ds.observations.max(0), ds.next_observations.max(0))) / 2
    a_mid = (ds.actions.min(0) + ds.actions.max(0)) / 2
    squeeze = lambda x, mid: (mid + 0.5 * (x - mid)).astype(np.float32)  # noqa: E731
    narrow = Dataset(squeeze(ds.observations, o_mid), squeeze(ds.actions, a_mid), ds.rewards,
                     squeeze(ds.next_observations, o_mid), ds.terminals, ds.timeouts,
                     name=ds.name)
    lim = dataset_limits(narrow)
    start = torch.as_tensor(narrow.observations[:16])
    outs = {}
    for clip in (True, False):
        gen = make_generator(narrow, {"rollout_batch_size": 16, "filter": "none", "clip": clip},
                             models, "cpu")
        assert (gen.limits is not None) == clip
        torch.manual_seed(0)
        outs[clip] = gen.generate(agent, start)
    on, off = outs[True], outs[False]
    assert inside(on["obs"], lim.obs_lo, lim.obs_hi)
    assert inside(on["next_obs"], lim.obs_lo, lim.obs_hi)
    assert inside(on["actions"], lim.act_lo, lim.act_hi)
    assert not (inside(off["obs"], lim.obs_lo, lim.obs_hi)
                and inside(off["next_obs"], lim.obs_lo, lim.obs_hi)
                and inside(off["actions"], lim.act_lo, lim.act_hi))
    # Termination sees the clipped next states.
    from harness.envs import termination_fn
    assert torch.equal(on["terminals"].bool(), termination_fn(narrow.name)(on["next_obs"]))
    # The diffusion start needs no ensemble.
    dirs = {k: v for k, v in models.items() if k != "ensemble-dydiff"}
    assert make_generator(narrow, {"init": "diffusion"}, dirs, "cpu").ensemble is None


def test_a_diffusion_start_needs_a_model_trained_with_action_dropout(hopper_random, models,
                                                                     tmp_path):
    """init 'diffusion' samples action-free, which a model trained always action-conditioned
    (the authors' action_cond_prob 1) never learnt: make_generator refuses it in one line."""
    train_diffusion(hopper_random, {**TINY_DIFFUSION, "action_cond_prob": 1.0, "train_steps": 2,
                                    "checkpoint_every": 2}, tmp_path, seed=0, progress=False,
                    device="cpu")
    with pytest.raises(ValueError, match="trained always action-conditioned"):
        make_generator(hopper_random, {"init": "diffusion"}, {**models, "diffusion": tmp_path},
                       "cpu")
    assert make_generator(hopper_random, {"init": "diffusion"}, models,
                          "cpu").dynamics.action_cond_prob == 0.9
