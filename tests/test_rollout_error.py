"""Rollout-error study against the MuJoCo simulator (Hopper-v5, tiny sizes)."""
import numpy as np
import pandas as pd
import pytest
import torch

from analysis import plotting
from analysis import rollout_error as re
from harness.data.dataset import Dataset, DatasetError
from harness.envs import make_env

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
    no_states = Dataset(data.observations, data.actions, data.rewards, data.next_observations,
                        data.terminals, data.timeouts, name="hopper-random")
    with pytest.raises(DatasetError, match="qpos"):
        re.rollout_error_study(no_states, {}, horizon=5, n_starts=2, progress=False)

    class Wrong:
        def open_loop(self, s, a):
            return torch.zeros(len(s), 3, 11)
    with pytest.raises(ValueError, match="'wrong': open_loop returned shape"):
        re.rollout_error_study(data, {"wrong": Wrong()}, horizon=5, n_starts=2, progress=False)


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
         "|predicted - true return| (reward units)")]
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
