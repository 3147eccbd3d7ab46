"""Rollout-error study against the MuJoCo simulator (Hopper-v5, tiny sizes)."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import plotting
from analysis import rollout_error as re
from harness.data.dataset import Dataset, DatasetError
from harness.envs import make_env, restore_state
from test_dydiff_fidelity import models  # noqa: F401  (fixture: tiny trained diffusion,
#                                           ensemble and reward model dirs on random Hopper)

torch.set_num_threads(1)


def _hopper_dataset(episodes=4, max_len=40, seed=0) -> Dataset:
    """Random-policy Hopper-v5 data with simulator states, as the local generator stores it."""
    env = make_env("hopper")
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in ("observations", "actions", "rewards", "next_observations",
                            "terminals", "timeouts", "qpos", "qvel")}
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        for t in range(max_len):
            base = env.unwrapped
            cols["qpos"].append(base.data.qpos.copy())
            cols["qvel"].append(base.data.qvel.copy())
            a = rng.uniform(-1, 1, 3).astype(np.float32)
            nxt, r, term, _trunc, _ = env.step(a)
            for k, v in (("observations", obs), ("actions", a), ("rewards", r),
                         ("next_observations", nxt), ("terminals", term),
                         ("timeouts", t == max_len - 1 and not term)):
                cols[k].append(v)
            obs = nxt
            if term:
                break
    return Dataset(**{k: np.array(v) for k, v in cols.items()}, name="hopper-random")


class LinearAgent:
    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.w = 0.3 * torch.randn(11, 3, generator=g)

    def act(self, obs, deterministic=True):
        return torch.tanh(obs.float() @ self.w)


class NoisyModel:
    """The simulator with Gaussian noise added to its predictions (an imperfect model)."""

    def __init__(self, sim, scale):
        self.sim, self.scale = sim, scale

    def open_loop(self, start_obs, actions):
        out = self.sim.open_loop(start_obs, actions)
        return out + self.scale * torch.randn(out.shape, generator=torch.Generator().manual_seed(0),
                                              dtype=out.dtype)

    def policy_rollout(self, start_obs, agent, H):
        out = dict(self.sim.policy_rollout(start_obs, agent, H))
        out["next_obs"] = out["next_obs"] + self.scale
        out["rewards"] = out["rewards"] + 1.0
        return out


@pytest.fixture(scope="module")
def data():
    return _hopper_dataset()


def test_simulator_reproduces_recorded_transitions(data):
    sim = re.SimulatorModel(data.name, data)
    starts = np.array([0, 5, 10])
    acts, valid = re.behaviour_actions(data, starts, 3)
    assert valid.all()
    out = sim.simulate(data.qpos[starts], data.qvel[starts], actions=acts)
    want = data.next_observations[starts[:, None] + np.arange(3)]
    np.testing.assert_allclose(out["next_obs"], want, atol=1e-5)
    np.testing.assert_allclose(out["rewards"], data.rewards[starts[:, None] + np.arange(3)],
                               atol=1e-4)


def test_behaviour_actions_mask_episode_end(data):
    ends = np.flatnonzero(data.episode_ends())
    start = ends[0] - 2  # three steps left in the first episode
    acts, valid = re.behaviour_actions(data, np.array([start]), 6)
    assert valid[0].tolist() == [True] * 3 + [False] * 3
    assert (acts[0, 3:] == 0).all()
    np.testing.assert_array_equal(acts[0, :3], data.actions[start:start + 3])


def test_alive_mask_keeps_the_terminal_step():
    from harness.envs import alive_mask
    term = np.array([[False, True, False, False], [False] * 4])
    assert alive_mask(term).tolist() == [[True, True, False, False], [True] * 4]


def test_simulator_model_error_is_exactly_zero(data):
    models = {"simulator": re.SimulatorModel(data.name, data),
              "noisy": NoisyModel(re.SimulatorModel(data.name, data), 0.05)}
    df = re.rollout_error_study(data, models, agent=LinearAgent(), horizon=12, n_starts=8,
                                seed=0, reps=50, progress=False)
    assert set(df["mode"]) == {"behaviour", "policy"} and len(df) == 2 * 2 * 12
    perfect = df[df.model == "simulator"]
    assert (perfect.state_mse == 0).all() and (perfect.state_mse_hi == 0).all()
    assert (perfect[perfect["mode"] == "policy"].return_err == 0).all()
    noisy = df[df.model == "noisy"]
    assert (noisy.state_mse > 0).all()
    # policy mode: +1 reward per step -> |return error| at h equals the number of valid steps
    pol = noisy[noisy["mode"] == "policy"]
    assert pol.return_err.iloc[0] == pytest.approx(1.0)
    assert pol.return_err.is_monotonic_increasing
    # random Hopper falls within 12 steps for some starts: masked steps shrink n_valid
    assert df.n_valid.iloc[0] == 8 and df.n_valid.min() < 8
    # same seed -> same numbers
    again = re.rollout_error_study(data, {"noisy": models["noisy"]}, horizon=12, n_starts=8,
                                   seed=0, reps=50, progress=False)
    pd.testing.assert_frame_equal(
        again.reset_index(drop=True),
        noisy[noisy["mode"] == "behaviour"].reset_index(drop=True))


def test_bootstrap_ci_contains_mean():
    rng = np.random.default_rng(0)
    v = rng.normal(3.0, 1.0, (400, 2))
    point, lo, hi = re.bootstrap_masked_mean(v, np.ones_like(v, bool), 300, rng)
    assert (lo < 3.0).all() and (3.0 < hi).all() and (lo < point).all() and (point < hi).all()


def test_bad_inputs(data, tmp_path):
    class Wrong:
        def open_loop(self, s, a):
            return torch.zeros(len(s), 3, 11)
    with pytest.raises(ValueError, match="'wrong': open_loop returned shape"):
        re.rollout_error_study(data, {"wrong": Wrong()}, horizon=5, n_starts=2, progress=False)


# --- datasets without qpos/qvel: states reconstructed from observations ----------------------

@pytest.mark.parametrize("task", ["hopper", "walker2d", "halfcheetah"])
def test_reconstructed_state_reproduces_the_simulators_next_observation(task):
    from datagen.generate import random_dataset
    ds = random_dataset(task, 200, seed=0)
    env = make_env(task)
    env.reset(seed=0)
    nq, nv = env.unwrapped.model.nq, env.unwrapped.model.nv
    qpos, qvel = re.states_from_observations(ds.observations, nq, nv)
    assert (qpos[:, 0] == 0).all() and np.abs(ds.qpos[:, 0]).max() > 0.1  # x really differs
    clipped = re.clipped_velocities(task, ds.observations, nq)
    nxt, shown = [], []
    for i in range(len(ds)):
        shown.append(restore_state(env, qpos[i], qvel[i]))
        nxt.append(env.unwrapped.step(ds.actions[i])[0])
    # Every reconstructed state shows exactly the stored observation (clipped or not) ...
    np.testing.assert_array_equal(np.array(shown, np.float32), ds.observations)
    # ... and, where no velocity sits at the observation clip, the simulator steps from it to
    # the stored next observation (float32 observations: ~1e-6 relative).
    ok = ~clipped
    assert ok.sum() >= 50
    err = np.abs(np.array(nxt)[ok] - ds.next_observations[ok])
    assert (err <= 1e-5 * (1 + np.abs(ds.next_observations[ok]))).all(), err.max()
    if task == "hopper":
        assert err.max() < 1e-6
    # Where a velocity was clipped, the true velocity is lost (the warning counts those rows).
    assert clipped.sum() == (np.abs(ds.qvel) > 10).any(1).sum() if task != "halfcheetah" \
        else not clipped.any()


def test_study_without_stored_states_reconstructs_them(data, caplog):
    no_states = Dataset(data.observations, data.actions, data.rewards, data.next_observations,
                        data.terminals, data.timeouts, name="hopper-random")
    kw = dict(agent=LinearAgent(), horizon=6, n_starts=8, seed=0, reps=20, progress=False)
    with caplog.at_level("WARNING", logger="dydiff.analysis"):
        df = re.rollout_error_study(no_states, {"simulator": re.SimulatorModel(no_states.name)},
                                    **kw)
    assert "stores no qpos/qvel: simulator states reconstructed" in caplog.text
    assert (df.state_mse == 0).all()
    # The reconstructed truth is the stored-state truth (x shifted, which nothing sees):
    # a noisy model scores the same against either.
    noisy = lambda d: {"noisy": NoisyModel(re.SimulatorModel(d.name, d), 0.05)}  # noqa: E731
    a = re.rollout_error_study(no_states, noisy(no_states), **kw)
    b = re.rollout_error_study(data, noisy(data), **kw)
    np.testing.assert_allclose(a.state_mse, b.state_mse, rtol=1e-4)
    with pytest.raises(DatasetError, match="nq - 1 \\+ nv"):
        re.states_from_observations(np.zeros((2, 10)), 6, 6)


# --- the DyDiff generator as a third model, and the action gap --------------------------------

def test_cond_actions_are_the_actions_each_transition_was_generated_with():
    """On the exact oracle without averaging, s_{t+1} = f(s_t, a_t) holds for the recorded
    a_t = cond_actions at every step, over chained windows; the gap to pi(s_t) is not 0."""
    from test_dydiff_rollout import LinearPolicy, _oracle_dynamics
    dyn, agent = _oracle_dynamics(horizon=6), LinearPolicy()
    start = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    out = dyn.policy_rollout(start, agent, 12, average_states=False)
    torch.manual_seed(0)
    ref = dyn.policy_rollout(start, agent, 12, average_states=False)
    assert all(torch.equal(out[k], ref[k]) for k in ("obs", "actions", "next_obs"))
    a = out["cond_actions"]
    assert a.shape == (5, 12, 2)
    f = 0.9 * out["obs"] + 0.3 * torch.cat([a, a[..., :1]], -1)
    torch.testing.assert_close(out["next_obs"], f, atol=1e-5, rtol=0)
    gap = re.action_gap(agent, out["obs"], a)
    # Each window's first row is its given start state, so pi(s_0) is what was injected there.
    assert gap.shape == (5, 12) and (gap[:, [0, 5, 10]] < 1e-6).all()
    assert gap[:, 2:5].mean() > 1e-3
    np.testing.assert_allclose(re.action_gap(agent, out["obs"], out["actions"]), 0, atol=1e-6)


def _never_done(next_obs):
    return torch.zeros(next_obs.shape[:-1], dtype=torch.bool)


def test_dydiff_model_is_the_training_generators_rollout(hopper_random, models):
    from dydiff.diffusion import load_diffusion
    from dydiff.rollout import DyDiffConfig, dataset_limits
    from harness.registry import load_model
    model = re.DyDiffModel.from_dirs(hopper_random, models)
    assert model.generator.cfg == DyDiffConfig()  # the authors' settings: ensemble, K=2, clip
    assert model.generator.cfg.init == "ensemble" and model.generator.cfg.clip
    agent, n = LinearAgent(), 12
    start = torch.as_tensor(hopper_random.observations[:n])
    # (1) what generate() samples in training (no filter, no truncation: every transition).
    gen = re.DyDiffModel.from_dirs(hopper_random, models, {"filter": "none"}).generator
    gen.done_fn, T = _never_done, gen.length
    torch.manual_seed(0)
    want = gen.generate(agent, start)
    torch.manual_seed(0)
    got = model.policy_rollout(start, agent, T)
    for key in ("obs", "actions", "next_obs"):
        assert torch.equal(got[key].reshape(n * T, -1), want[key]), key
    # (2) chained windows: the sampler's own policy_rollout / inject with the same settings.
    dyn = load_diffusion(models["diffusion"])
    ens = load_model("ensemble-dydiff", models["ensemble-dydiff"])
    lim = dataset_limits(hopper_random)
    H = 2 * T + 3
    torch.manual_seed(1)
    got = model.policy_rollout(start, agent, H)
    torch.manual_seed(1)
    ref = dyn.policy_rollout(start, agent, H, 2, True, "ensemble", lim, ens)
    for key in ("obs", "actions", "next_obs"):
        assert torch.equal(got[key], ref[key]), key
    torch.manual_seed(1)
    first = dyn.inject(start, agent, 2, True, "ensemble", None, lim, ens)
    assert torch.equal(got["cond_actions"][:, :T], first["cond_actions"][:, :T])
    # Teeth: the diffusion model alone (diffusion start, no clipping) is another rollout.
    torch.manual_seed(1)
    alone = dyn.policy_rollout(start, agent, H)
    assert not torch.allclose(alone["next_obs"], got["next_obs"])


def test_study_with_dydiff_and_action_gap(hopper_random, models, tmp_path):
    from baselines.ensemble import load_ensemble
    from dydiff.diffusion import load_diffusion
    agent = LinearAgent()
    study = {"ensemble": load_ensemble(models["ensemble"]),
             "diffusion": load_diffusion(models["diffusion"]),
             "dydiff": re.DyDiffModel.from_dirs(hopper_random, models),
             "simulator": re.SimulatorModel(hopper_random.name, hopper_random)}
    torch.manual_seed(0)
    df = re.rollout_error_study(hopper_random, study, agent=agent, horizon=10, n_starts=8,
                                seed=0, reps=50, progress=False)
    assert {"action_gap", "action_gap_lo", "action_gap_hi"} <= set(df.columns)
    beh, pol = df[df["mode"] == "behaviour"], df[df["mode"] == "policy"]
    assert list(beh.model.unique()) == ["ensemble", "diffusion", "simulator"]  # no open loop
    assert list(pol.model.unique()) == ["ensemble", "diffusion", "dydiff", "simulator"]
    assert beh.action_gap.isna().all() and len(pol) == 4 * 10
    gap = pol.groupby("model").action_gap
    assert (gap.max()[["ensemble", "simulator"]] == 0).all()  # they step with pi exactly
    later = pol[pol.horizon > 1].groupby("model").action_gap
    assert (later.mean()[["diffusion", "dydiff"]] > 1e-3).all()
    assert (pol[pol.horizon == 1].set_index("model").action_gap < 1e-6).all()  # s_0 is given
    g = pol[pol.model == "dydiff"]
    assert (g.action_gap_lo <= g.action_gap).all() and (g.action_gap <= g.action_gap_hi).all()
    assert (pol[pol.model == "simulator"].state_mse == 0).all()
    from analysis.summary import _rollout_section
    text = "\n".join(_rollout_section(df))
    assert "Gap 0 at every step for ensemble, simulator" in text
    assert "dydiff: policy actions only" in text and "dydiff vs the diffusion model" in text
    with pytest.raises(ValueError, match="only roll out with the policy"):
        re.rollout_error_study(hopper_random, {"dydiff": study["dydiff"]}, horizon=3,
                               n_starts=2, progress=False)
    # End to end, as the job step builds it: dydiff from the step's ensemble/diffusion/reward.
    out = re.run_rollout_error(hopper_random, {k: models[k] for k in ("ensemble", "diffusion")},
                               tmp_path, policy=tmp_path / "policy.pt",
                               agent_loader=lambda path, device: agent, horizon=4, n_starts=4,
                               reps=20, progress=False, reward_dir=models["reward"], dydiff={},
                               dydiff_ensemble_dir=models["ensemble-dydiff"])
    csv = pd.read_csv(tmp_path / "rollout_error.csv")
    assert set(csv.model[csv["mode"] == "policy"]) == {"ensemble", "diffusion", "dydiff"}
    assert "dydiff" not in set(csv.model[csv["mode"] == "behaviour"])
    assert csv[csv["mode"] == "policy"].action_gap.notna().all()
    assert csv[csv["mode"] == "policy"].return_err.notna().all()  # the reward model scores it
    assert (tmp_path / "rollout_error.png").exists() and out["task"] == "hopper-random"


def test_rollout_error_step_adds_dydiff_from_the_steps_models(monkeypatch, tmp_path):
    seen = {}

    def fake(dataset, runs, out_dir, **kw):
        seen.update(runs=runs, **kw)
        return {"rollout_error": pd.DataFrame(
            [{"mode": "policy", "model": m, "horizon": 1, "state_mse": 1.0, "action_gap": 0.5}
             for m in ("dydiff", "diffusion K=2")]),
            "runs": [{"seed": 0, "policy_data_action_distance": 0.25}]}
    monkeypatch.setattr(re, "run_rollout_errors", fake)
    spec = {"dataset": "d.hdf5", "out": str(tmp_path),
            "runs": [{"seed": 0, "policy_dir": str(tmp_path),
                      "model_dirs": {k: str(tmp_path / k) for k in
                                     ("ensemble", "ensemble-dydiff", "diffusion", "reward")}}],
            "config": {"horizon": 5, "n_starts": 2, "seed": 0}}
    got = re.rollout_error_step(spec)
    run, = seen["runs"]
    assert seen["dydiff"] == {} and run["reward_dir"] == tmp_path / "reward"
    # MOPO's ensemble is a study model; DyDiff's own starts the dydiff generator.
    assert set(run["model_dirs"]) == {"ensemble", "diffusion"}
    assert run["dydiff_ensemble_dir"] == tmp_path / "ensemble-dydiff"
    assert seen["injections"] == () and seen["fast_sampler"] is False and seen["reseed"]
    # Metric names MLflow accepts (no "="): a K row's K is kept without it.
    assert got == {"policy/dydiff/state_mse_at_H": 1.0, "policy/dydiff/action_gap_mean": 0.5,
                   "policy/diffusion K2/state_mse_at_H": 1.0,
                   "policy/diffusion K2/action_gap_mean": 0.5,
                   "policy/data_action_distance": 0.25}
    from mlflow.utils.validation import _validate_metric_name
    for key in got:
        _validate_metric_name(key)


def test_plan_runs_one_study_per_model_seed():
    """rollout_error.model_seeds: all gives one run per seed, each with that seed's models and
    policy; first (the default) the first seed's alone; bad injection counts are refused."""
    from harness import plan
    from harness.config import ConfigError
    base = plan.resolve(plan.load_config("config/rollout-study.yaml"))
    spec = plan.rollout_error_job(base, "halfcheetah-medium")
    assert [r["seed"] for r in spec["runs"]] == [0, 1, 2]
    assert len({r["model_dirs"]["diffusion"] for r in spec["runs"]}) == 3
    assert len({r["policy_dir"] for r in spec["runs"]}) == 3
    assert spec["config"]["injections"] == [0, 1, 2, 4] and spec["config"]["fast_sampler"]
    first = dict(base, rollout_error={**base["rollout_error"], "model_seeds": "first"})
    assert [r["seed"] for r in plan.rollout_error_job(first, "halfcheetah-medium")["runs"]] == [0]
    bad = dict(base, rollout_error={**base["rollout_error"], "injections": [1, 1]})
    with pytest.raises(ConfigError, match="injections"):
        plan.resolve(bad)


def test_hierarchical_bootstrap_carries_seed_variance():
    from analysis.rollout_stats import bootstrap_masked_mean, hierarchical_bootstrap_mean
    rng = np.random.default_rng(0)
    # Three seeds whose models differ (offsets 0, 1, 2), small noise within each seed.
    v = np.array([0.0, 1.0, 2.0])[:, None, None] + 0.01 * rng.standard_normal((3, 50, 4))
    mask = np.ones_like(v, bool)
    point, lo, hi = hierarchical_bootstrap_mean(v, mask, 2000, np.random.default_rng(1))
    np.testing.assert_allclose(point, v.mean((0, 1)))
    assert (lo < 0.6).all() and (hi > 1.4).all()  # the seeds' spread is in the interval
    # Pooling the starts alone (the seeds as if they were more starts) would hide it.
    _, flat_lo, flat_hi = bootstrap_masked_mean(v.reshape(150, 4), mask.reshape(150, 4), 2000,
                                                np.random.default_rng(1))
    assert ((flat_hi - flat_lo) < 0.5 * (hi - lo)).all()
    # Masked entries count nowhere.
    mask[0, :, 2:] = False
    point, _, _ = hierarchical_bootstrap_mean(v, mask, 200, np.random.default_rng(1))
    np.testing.assert_allclose(point[2:], v[1:, :, 2:].mean((0, 1)))


def test_injection_rows_pooled_over_seeds(hopper_random, models, tmp_path):
    """The study's new rows at tiny size, as the DAG step builds them: the diffusion model
    from its own action-free sample (K = 0) and with K injections, beside the DyDiff generator
    with the authors' and the fast sampler, two runs pooled."""
    agent = LinearAgent()
    run = {"model_dirs": {k: models[k] for k in ("ensemble", "diffusion")},
           "policy": tmp_path / "policy.pt", "reward_dir": models["reward"],
           "dydiff_ensemble_dir": models["ensemble-dydiff"]}
    out = re.run_rollout_errors(hopper_random, [{**run, "seed": 0}, {**run, "seed": 1}], tmp_path,
                                agent_loader=lambda path, device: agent, horizon=9, n_starts=6,
                                reps=50, progress=False, dydiff={}, reseed=True,
                                injections=[0, 1, 2], fast_sampler=True)
    df = out["rollout_error"]
    pol = df[df["mode"] == "policy"]
    assert list(dict.fromkeys(pol.model)) == ["ensemble", "dydiff", "dydiff fast",
                                              "diffusion K=0", "diffusion K=1", "diffusion K=2"]
    assert set(df.model[df["mode"] == "behaviour"]) == {"ensemble", "diffusion"}
    assert (df.n_seeds == 2).all()
    gap1 = pol[pol.horizon == 1].set_index("model").action_gap
    # K = 0 steps with the model's own (behaviour) actions: pi(s_0) was never injected, so the
    # first transition's gap is the model's action vs the policy's; with K >= 1 the first row
    # (the given start, the same for every iteration) was generated with exactly pi(s_0).
    assert gap1["diffusion K=0"] > 0.05
    assert gap1[["diffusion K=1", "diffusion K=2"]].abs().max() < 1e-5
    assert (pol[pol.model == "ensemble"].action_gap == 0).all()
    # Pooled curves are the valid-count-weighted means of the per-seed ones.
    by_seed = pd.read_csv(tmp_path / "rollout_error_by_seed.csv")
    assert sorted(by_seed.seed.unique()) == [0, 1]
    for (mode, model), g in by_seed.groupby(["mode", "model"]):
        w = g.pivot(index="horizon", columns="seed", values="n_valid")
        m = g.pivot(index="horizon", columns="seed", values="state_mse")
        want = (w * m).sum(1) / w.sum(1)
        got = df[(df["mode"] == mode) & (df.model == model)].set_index("horizon").state_mse
        np.testing.assert_allclose(got, want, rtol=1e-4, err_msg=f"{mode}/{model}")
    runs = json.loads((tmp_path / "rollout_error_runs.json").read_text())
    assert [r["seed"] for r in runs] == [0, 1]
    assert all(r["policy_data_action_distance"] > 0 for r in runs)
    assert (tmp_path / "rollout_error_at_H.png").exists()


def test_plot_rollout_error(data, tmp_path, monkeypatch):
    models = {"noisy": NoisyModel(re.SimulatorModel(data.name, data), 0.05)}
    df = re.rollout_error_study(data, models, agent=LinearAgent(), horizon=10, n_starts=6,
                                reps=50, progress=False)
    figs = []
    real = plotting.save_figure
    monkeypatch.setattr(plotting, "save_figure",
                        lambda fig, stem, close=True: figs.append(fig) or real(fig, stem, False))
    paths = re.plot_rollout_error(df, tmp_path, "hopper-random")
    assert len(figs) == 1
    shown = [ax for ax in figs[0].axes if ax.has_data()]
    assert [(ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) for ax in shown] == [
        ("hopper-random state error, dataset actions (open loop)", "rollout horizon h (steps)",
         "normalised state MSE (obs std units²)"),
        ("hopper-random state error, policy actions", "rollout horizon h (steps)",
         "normalised state MSE (obs std units²)"),
        ("return error, policy actions", "rollout horizon h (steps)",
         "|predicted - true return| (reward units)"),
        ("action gap, policy actions", "rollout horizon h (steps)",
         "mean ||a_t - pi(s_t)|| (action units)")]
    assert [ax.get_yscale() for ax in shown[:2]] == ["log", "log"]
    assert all([t.get_text() for t in ax.get_legend().get_texts()] == ["noisy"] for ax in shown)
    png = tmp_path / "rollout_error.png"
    assert png in paths and png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000


def test_run_rollout_error_writes_outputs(data, tmp_path):
    out = re.run_rollout_error(data, {}, tmp_path, horizon=5, n_starts=4, reps=20,
                               include_simulator=True, progress=False)
    csv = pd.read_csv(tmp_path / "rollout_error.csv")
    assert (csv.model == "simulator").all() and (csv.state_mse == 0).all()
    assert (tmp_path / "rollout_error.pdf").exists() and out["task"] == "hopper-random"
    with pytest.raises(KeyError, match="no loader for model kind 'nope'"):
        re.run_rollout_error(data, {"nope": tmp_path}, tmp_path, horizon=5, n_starts=2)


def test_summary_reports_rollout_error_per_task():
    import pandas as pd
    from analysis.summary import _rollout_section
    rows = [{"mode": "behaviour", "model": m, "horizon": h, "state_mse": s * h,
             "state_mse_lo": 0.0, "state_mse_hi": 1.0, "n_valid": 4, "return_err": float("nan"),
             "return_err_lo": float("nan"), "return_err_hi": float("nan"), "task": t}
            for t in ("hopper-medium-replay", "halfcheetah-random")
            for m, s in (("diffusion", 1.0), ("ensemble", 2.0)) for h in (1, 2)]
    lines = [l for l in _rollout_section(pd.DataFrame(rows)) if l.startswith("- ")]
    assert [l.split(" (")[0] for l in lines] == ["- hopper-medium-replay", "- halfcheetah-random"]
    assert all("diffusion 1 at h=1 -> 2" in l for l in lines)


def test_summary_reports_dydiff_and_the_action_gap():
    from analysis.summary import _rollout_section
    nan = float("nan")
    gaps = {"ensemble": (0.0, 0.0, 0.0), "diffusion": (0.3, 0.25, 0.35),
            "dydiff": (0.1, 0.08, 0.12)}
    rows = [{"mode": mode, "model": m, "horizon": h, "state_mse": 0.1 * h, "state_mse_lo": 0.0,
             "state_mse_hi": 1.0, "n_valid": 4, "return_err": nan, "return_err_lo": nan,
             "return_err_hi": nan,
             **dict(zip(("action_gap", "action_gap_lo", "action_gap_hi"),
                        gaps[m] if mode == "policy" else (nan,) * 3))}
            for mode in ("behaviour", "policy") for m in gaps
            if not (mode == "behaviour" and m == "dydiff") for h in (1, 2)]
    text = "\n".join(_rollout_section({"task": "hopper-medium", "rollout_error":
                                       pd.DataFrame(rows)}))
    assert "dydiff: policy actions only (no open-loop mode)" in text
    assert "dydiff = the DyDiff generator as training samples it" in text
    assert "ensemble 0, 0 [0, 0]; diffusion 0.3, 0.3 [0.25, 0.35]; dydiff 0.1" in text
    assert "Gap 0 at every step for ensemble:" in text
    assert "mean gap 0.1 vs 0.3; their CIs are apart at 2 of 2 steps with dydiff lower and " \
           "at 0 with dydiff higher" in text
    # Overlapping CIs: no separation claimed.
    for r in rows:
        if r["model"] == "dydiff":
            r.update(action_gap=0.28, action_gap_lo=0.2, action_gap_hi=0.3)
    text = "\n".join(_rollout_section(pd.DataFrame(rows)))
    assert "apart at 0 of 2 steps with dydiff lower and at 0 with dydiff higher" in text


def test_always_conditioned_diffusion_model_has_no_default_policy_row(hopper_random, tmp_path,
                                                                       caplog):
    """A model trained always action-conditioned (the authors' action_cond_prob 1) never learnt
    to sample its own actions: its default policy rollout (init 'diffusion') would be an
    off-distribution sample, so the study keeps it in the open-loop panel only, and says so."""
    from dydiff.diffusion import train_diffusion
    from test_dydiff_rollout import TINY_DIFFUSION
    train_diffusion(hopper_random, {**TINY_DIFFUSION, "action_cond_prob": 1.0, "train_steps": 2},
                    tmp_path, seed=0, progress=False, device="cpu")
    with caplog.at_level("WARNING"):
        models = re.load_study_models(hopper_random, {"diffusion": tmp_path})
    assert isinstance(models["diffusion"], re.OpenLoopOnly)
    assert not hasattr(models["diffusion"], "policy_rollout")
    assert "cannot sample its own actions" in caplog.text
    df = re.rollout_error_study(hopper_random, models, agent=LinearAgent(), horizon=3,
                                n_starts=2, reps=10, progress=False)
    assert set(df["mode"]) == {"behaviour"}
