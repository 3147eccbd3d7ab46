"""The DyDiff deviations of issue 26 (items 1-7), each closed: config/paper.yaml, resolved
through the planner, runs the authors' behaviour (FineArtz/DyDiff at 52f6540; file:line in
baselines/reference_settings.yaml), shown here on small inputs. The former behaviour of each
stays a named setting (tests/test_diffusion.py, test_dydiff_fidelity.py and
test_dydiff_equivalence.py exercise it)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from harness import plan
from harness.config import from_dict
from harness.data.dataset import Dataset
from harness.training.offline_loop import OfflineConfig
from dydiff.diffusion import DiffusionConfig, build_denoiser, train_step, make_optimizer
from dydiff.edm import apply_conditioning, edm_loss
from dydiff.reward_model import RewardModelConfig, train_reward_model
from dydiff.rollout import (DyDiffConfig, dataset_limits, filter_trajectories,
                            softmax_filter_logits)
from dydiff.sampler import SamplerConfig, edm_sample
from dydiff.segments import PAD_VALUE, Normalizer, make_segments
from test_diffusion import TINY, toy_dataset

PAPER = "config/paper.yaml"
TASK = "hopper-medium-replay"


@pytest.fixture(scope="module")
def paper():
    return plan.load_config(PAPER)


def paper_model(cfg, name):
    return plan.model_job(cfg, name, TASK, 0)["config"]["model"]


def paper_policy(cfg, method="dydiff-td3bc"):
    return plan.policy_job(cfg, method, TASK, 0)["config"]["policy"]


class Spy(nn.Module):
    """A denoiser that records its inputs and returns a fixed linear map of them (float32)."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x, sigma):
        self.inputs.append((x.clone(), torch.as_tensor(sigma).clone()))
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1) if torch.as_tensor(
            sigma).dim() else torch.as_tensor(sigma, dtype=x.dtype)
        return 0.25 * x / (1 + s ** 2) + 0.1


def authors_condition_guidance_sampler(net, shape, obs_dim, start, actions, cfg, g):
    """generate_rl.py:36-90 (`condition_guidance_sampler`) as the authors run it, for the
    test: float64 levels and updates, the network in float32, x_hat not conditioned; the
    same draws as edm_sample (float32 latents, float64 churn noise from `g`)."""
    n = cfg.num_steps
    idx = torch.arange(n, dtype=torch.float64)
    t = (cfg.sigma_max ** (1 / cfg.rho) + idx / (n - 1) * (
        cfg.sigma_min ** (1 / cfg.rho) - cfg.sigma_max ** (1 / cfg.rho))) ** cfg.rho
    t = torch.cat([t, torch.zeros_like(t[:1])])
    cond = lambda x: apply_conditioning(x, obs_dim, start, actions)  # noqa: E731
    x_next = cond(torch.randn(shape, generator=g).to(torch.float64) * t[0])
    for i, (t_cur, t_next) in enumerate(zip(t[:-1], t[1:])):
        x_cur = x_next
        gamma = min(cfg.S_churn / n, np.sqrt(2) - 1) if cfg.S_min <= t_cur <= cfg.S_max else 0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * cfg.S_noise * torch.randn(
            shape, generator=g, dtype=torch.float64)
        denoised = net(x_hat.float(), t_hat.float()).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = cond(x_hat + (t_next - t_hat) * d_cur)
        if i < n - 1:
            denoised = net(x_next.float(), t_next.float()).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        x_next = cond(x_next)
    return x_next


# --- item 1: the sampler --------------------------------------------------------------------

def test_item1_paper_sampler_is_the_authors_float64_unconditioned_churn(paper):
    sampler = from_dict(DiffusionConfig, paper_model(paper, "diffusion")).sampler
    assert (sampler.dtype, sampler.condition_churn) == ("float64", False)
    cfg = from_dict(SamplerConfig, {**vars(sampler), "num_steps": 8})
    torch.manual_seed(0)
    start, acts = torch.randn(3, 2), torch.randn(3, 5, 2)
    ours = edm_sample(Spy(), (3, 5, 4), 2, start, acts, cfg, torch.Generator().manual_seed(4))
    ref = authors_condition_guidance_sampler(Spy(), (3, 5, 4), 2, start, acts, cfg,
                                             torch.Generator().manual_seed(4))
    assert torch.equal(ours, ref.float())
    # The churned x_hat reaches the network unconditioned: at a step with churn (sigma in
    # [S_min, S_max]) its first state is not s_0.
    spy = Spy()
    edm_sample(spy, (3, 5, 4), 2, start, acts, cfg, torch.Generator().manual_seed(4))
    assert all(x.dtype == torch.float32 for x, _ in spy.inputs)
    assert any(not torch.allclose(x[:, 0, :2], start) for x, _ in spy.inputs[0::2])
    # The former (condition_churn, float32) is another sampler: the test can fail.
    former = from_dict(SamplerConfig, {**vars(cfg), "dtype": "float32", "condition_churn": True})
    other = edm_sample(Spy(), (3, 5, 4), 2, start, acts, former, torch.Generator().manual_seed(4))
    assert not torch.allclose(other, ours, atol=1e-4)


# --- item 2: always action-conditioned, loss summed over every entry --------------------------

def test_item2_paper_loss_conditions_every_sample_and_sums_every_entry(paper):
    cfg = from_dict(DiffusionConfig, paper_model(paper, "diffusion"))
    assert (cfg.action_cond_prob, cfg.loss_form) == (1.0, "sum")
    torch.manual_seed(1)
    x0 = torch.randn(6, 5, 4)
    mask = torch.ones_like(x0)
    den = build_denoiser(from_dict(DiffusionConfig, TINY), 4)
    spy_in = []
    den.register_forward_pre_hook(lambda m, a: spy_in.append((a[0].clone(), a[1].clone())))
    out = []
    den.register_forward_hook(lambda m, a, y: out.append(y.detach()))
    loss = edm_loss(den, x0, mask, 2, cfg.P_mean, cfg.P_std, cfg.action_cond_prob, cfg.loss_form)
    noisy, sigma = spy_in[0]
    assert torch.equal(noisy[:, :, 2:], x0[:, :, 2:])   # every sample: clean actions
    assert torch.equal(noisy[:, 0, :2], x0[:, 0, :2])   # and the first state
    s = sigma[:, None, None]
    weight = (s ** 2 + 0.25) / (s * 0.5) ** 2
    want = (weight * (out[0] - x0) ** 2).sum() / 6       # every entry, per-sample sum, mean
    torch.testing.assert_close(loss.detach(), want)
    torch.manual_seed(1)
    former = edm_loss(den, x0, mask, 2, cfg.P_mean, cfg.P_std, 1.0, "masked_mean")
    assert not torch.allclose(former, loss)


# --- item 3: constant padding, observation/action rows only -----------------------------------

def test_item3_paper_segments_pad_with_the_constant_and_train_on_it(paper):
    cfg = from_dict(DiffusionConfig, {**paper_model(paper, "diffusion"), "horizon": 8})
    assert cfg.padding == "constant"
    ds = toy_dataset()  # 9 episodes of 20 steps, 3 of 4 (every 4th)
    seg = make_segments(ds, cfg.horizon, kind=cfg.normalizer, padding=cfg.padding)
    # Long episodes: L - H + 1 windows of their L rows (no [s_L, 0] row); short ones: one.
    assert len(seg) == 9 * (20 - 8 + 1) + 3
    x, mask = seg.batch(torch.arange(len(seg)))
    assert torch.equal(mask, torch.ones_like(mask))  # padding included in the loss
    short = x[0]  # episode 0 is short: 4 real rows, then the constant in every channel
    assert torch.equal(short[4:], torch.full_like(short[4:], PAD_VALUE))
    raw = seg.normalizer.unnormalize(short[:4])
    np.testing.assert_allclose(raw[:, :3], ds.observations[:4], atol=1e-5)
    # The last window of episode 1 ends on its last [s_t, a_t] row (rows 4..23 of the data).
    last = seg.normalizer.unnormalize(x[1 + 12])
    np.testing.assert_allclose(last[-1, :3], ds.observations[23], atol=1e-5)
    np.testing.assert_allclose(last[-1, 3:], ds.actions[23], atol=1e-5)
    # Training on these windows runs with every entry in the loss.
    tiny = from_dict(DiffusionConfig, {**TINY, "padding": "constant"})
    den, ema = build_denoiser(tiny, 5), build_denoiser(tiny, 5)
    assert math.isfinite(float(train_step(den, ema, make_optimizer(den.parameters(), tiny),
                                          seg, 0, tiny)))


# --- item 4: the clip box is the normaliser's range -------------------------------------------

def test_item4_paper_clip_box_is_the_normaliser_range(paper):
    rollout = from_dict(DyDiffConfig, paper_policy(paper)["rollout"])
    assert rollout.clip and rollout.clip_range == "normalizer"
    obs = np.array([[0.0, 1.0], [2.0, -1.0]], np.float32)
    nxt = np.array([[5.0, 0.0], [1.0, -3.0]], np.float32)  # beyond the observations' range
    act = np.array([[0.5], [-0.25]], np.float32)
    z = np.zeros(2, bool)
    ds = Dataset(obs, act, np.zeros(2, np.float32), nxt, z, z, name="hopper")
    lim = dataset_limits(ds, next_obs=rollout.clip_range == "with_next_obs")
    norm = Normalizer.fit(np.concatenate([obs, act], 1))  # the diffusion model's normaliser
    lo, hi = norm.shift - norm.scale, norm.shift + norm.scale
    np.testing.assert_allclose(lim.obs_lo, lo[:2]), np.testing.assert_allclose(lim.obs_hi, hi[:2])
    np.testing.assert_allclose(lim.act_lo, lo[2:]), np.testing.assert_allclose(lim.act_hi, hi[2:])
    assert lim.obs_hi.tolist() == [2.0, 1.0]  # not the next observations' 5.0


# --- item 5: DyDiff's start-state ensemble, as the authors train it ----------------------------

def _scaled_system(n=2000, seed=0, noise=0.02):
    """s' = s + (A z + B a) sigma, z = (s - mu) / sigma: states on very different scales
    (mu 5 and -3, sigma 10 and 0.1), so raw and standardised units differ a lot."""
    rng = np.random.default_rng(seed)
    mu, sigma = np.array([5.0, -3.0], np.float32), np.array([10.0, 0.1], np.float32)
    z = rng.standard_normal((n, 2)).astype(np.float32)
    act = rng.uniform(-1, 1, (n, 1)).astype(np.float32)
    dz = 0.3 * z[:, ::-1] * [1.0, -1.0] + 0.5 * act + noise * rng.standard_normal((n, 2))
    obs = mu + sigma * z
    nxt = (obs + sigma * dz).astype(np.float32)
    zero = np.zeros(n, bool)
    return Dataset(obs.astype(np.float32), act, rng.standard_normal(n).astype(np.float32), nxt,
                   zero, zero, name="toy-scaled")


def _dydiff_ensemble(**changes):
    from baselines.ensemble import DyDiffEnsembleConfig
    small = dict(num_members=3, num_elites=2, hidden=[32, 32],
                 weight_decay=[2.5e-5, 5e-5, 1e-4])
    return from_dict(DyDiffEnsembleConfig, {**small, **changes}, where="models.ensemble-dydiff")


def test_item5_paper_dydiff_starts_from_its_own_ensemble_with_the_authors_recipe(paper):
    dydiff, mopo = paper_model(paper, "ensemble-dydiff"), paper_model(paper, "ensemble")
    want = {"num_members": 7, "num_elites": 5, "hidden": [200] * 4, "lr": 1e-4,
            "batch_size": 256, "max_holdout": 5000, "patience": 8, "min_improvement": 0.0,
            "reward_head": False, "target_space": "standardized_obs", "keep": "last",
            "sampling": "bootstrap_permuted", "weight_decay_form": "adam", "member_loss": "mean",
            "weight_init": "torch_3d", "learned_logvar_bounds": False,
            "weight_decay": [2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4]}
    assert {k: dydiff[k] for k in want} == want
    # MOPO / MBPO keep OfflineRL-Kit's model.
    assert {k: mopo[k] for k in ("lr", "max_holdout", "patience", "min_improvement",
                                 "reward_head", "target_space", "keep", "sampling")} == {
        "lr": 1e-3, "max_holdout": 1000, "patience": 5, "min_improvement": 0.01,
        "reward_head": True, "target_space": "raw", "keep": "best", "sampling": "bootstrap"}
    # Each method's policy job reads its own model; both are trained per task x seed.
    for method in ("dydiff-td3bc", "dydiff-cql", "dydiff-diffql", "dydiff-td3bc-hardmax",
                   "dydiff-cql-k0"):
        dirs = plan.policy_job(paper, method, TASK, 1)["model_dirs"]
        assert set(dirs) == {"diffusion", "reward", "ensemble-dydiff"}, method
    mopo_dirs = plan.policy_job(paper, "mopo", TASK, 1)["model_dirs"]
    assert set(mopo_dirs) == {"ensemble"}
    dydiff_dirs = plan.policy_job(paper, "dydiff-td3bc", TASK, 1)["model_dirs"]
    assert dydiff_dirs["ensemble-dydiff"] != mopo_dirs["ensemble"]
    trained = {(j["model"], j["out"]) for j in plan.all_jobs(paper) if j["step"] == "train-model"}
    assert ("ensemble-dydiff", dydiff_dirs["ensemble-dydiff"]) in trained
    assert ("ensemble", mopo_dirs["ensemble"]) in trained


def test_item5_targets_are_deltas_of_standardised_states_without_a_reward(tmp_path):
    from baselines.ensemble import split_indices, train_ensemble
    ds = _scaled_system()
    cfg = _dydiff_ensemble(max_epochs=2)
    summary = train_ensemble(ds, cfg, tmp_path, seed=0, progress=False, device="cpu")
    state = torch.load(tmp_path / "model.pt", weights_only=True)["model"]
    obs = torch.as_tensor(ds.observations)
    std = obs.std(0, unbiased=False) + 1e-6  # the authors' np.std + 1e-6, over every row
    # Inputs [standardised obs, raw act]; outputs: the 2 state dims, no reward column.
    torch.testing.assert_close(state["input_norm.mean"], torch.cat([obs.mean(0), torch.zeros(1)]))
    torch.testing.assert_close(state["input_norm.std"], torch.cat([std, torch.ones(1)]))
    torch.testing.assert_close(state["target_scale"], std)
    assert state["layers.2.bias"].shape[-1] == 2 * 2  # mean and logvar of 2 outputs
    # The holdout MSE is in the standardised states' units: "next = current" scores the mean
    # squared standardised delta (raw units would give about 10^2 x that on dimension 0).
    _, hold = split_indices(len(obs), cfg, 0)
    delta = (torch.as_tensor(ds.next_observations) - obs)[hold] / std
    assert summary["holdout_obs_mse_trivial"] == pytest.approx(float(delta.square().mean()),
                                                               rel=1e-5)
    assert summary["holdout_mse_trivial"] == summary["holdout_obs_mse_trivial"]  # no reward


def test_item5_keep_last_keeps_the_last_epochs_weights_and_keep_best_the_best(tmp_path):
    from baselines.ensemble import train_ensemble
    ds = _scaled_system(n=1500)
    runs = {}
    for keep in ("last", "best"):  # lr 0.03: the holdout MSE rises again after its best
        summary = train_ensemble(ds, _dydiff_ensemble(keep=keep, lr=0.03, max_epochs=10,
                                                      patience=20),
                                 tmp_path / keep, seed=0, progress=False, device="cpu")
        rows = pd.read_parquet(tmp_path / keep / "metrics.parquet")
        runs[keep] = (summary, rows, torch.load(tmp_path / keep / "model.pt",
                                                weights_only=True)["model"])
    (last, rows, w_last), (best, rows_best, w_best) = runs["last"], runs["best"]
    pd.testing.assert_frame_equal(rows.drop(columns="wall_time_s"),
                                  rows_best.drop(columns="wall_time_s"))  # same training
    assert last["epochs"] == best["epochs"] == 10
    # keep last: every member's final weights, whose mean holdout MSE the last row logged.
    assert np.mean(last["holdout_mse"]) == pytest.approx(rows["holdout_mse"].iloc[-1], rel=1e-5)
    # keep best: each member at its best epoch, so no worse and here better than the last.
    assert all(b <= a for a, b in zip(last["holdout_mse"], best["holdout_mse"]))
    assert np.mean(best["holdout_mse"]) < np.mean(last["holdout_mse"])
    assert not torch.equal(w_last["layers.0.weight"], w_best["layers.0.weight"])


def test_item5_stops_after_8_epochs_without_any_improvement(tmp_path):
    """The authors' counter (patience 7, `>`): 1 epoch that improves on inf, then 8 that
    change nothing (lr 1e-12: float32 weights do not move) -> 9 epochs. MOPO's rule (patience
    5): 6. Any improvement counts: with updates too small for MOPO's 1 %, the authors' rule
    trains on (every epoch some member improves) while 1 % stops."""
    from baselines.ensemble import train_ensemble
    ds = _scaled_system(n=800)
    frozen = train_ensemble(ds, _dydiff_ensemble(lr=1e-12, max_epochs=30), tmp_path / "a",
                            seed=0, progress=False, device="cpu")
    assert frozen["epochs"] == 9
    mopo_rule = train_ensemble(ds, _dydiff_ensemble(lr=1e-12, max_epochs=30, patience=5,
                                                    min_improvement=0.01),
                               tmp_path / "b", seed=0, progress=False, device="cpu")
    assert mopo_rule["epochs"] == 6
    slow = dict(lr=2e-6, max_epochs=12)
    anything = train_ensemble(ds, _dydiff_ensemble(**slow), tmp_path / "c", seed=0,
                              progress=False, device="cpu")
    one_percent = train_ensemble(ds, _dydiff_ensemble(**slow, min_improvement=0.01),
                                 tmp_path / "d", seed=0, progress=False, device="cpu")
    assert anything["epochs"] == 12 and one_percent["epochs"] == 9


def test_item5_dydiff_ensemble_predicts_raw_next_states(tmp_path):
    from harness.registry import load_model
    from baselines.ensemble import train_ensemble
    ds = _scaled_system(n=4000)
    train_ensemble(ds, _dydiff_ensemble(lr=3e-3, max_epochs=40, patience=40), tmp_path, seed=0,
                   progress=False, device="cpu")
    model = load_model("ensemble-dydiff", tmp_path)
    test = _scaled_system(n=500, seed=1, noise=0.0)
    obs, act = torch.as_tensor(test.observations), torch.as_tensor(test.actions)
    mean, std = model.predict(obs, act)
    assert mean.shape == std.shape == (3, 500, 2)
    # The round trip: raw next = obs + (network delta in standardised units) x sigma.
    net_mean, net_logvar = model.net(torch.cat([obs, act], 1))
    scale = model.net.target_scale
    torch.testing.assert_close(mean, obs + net_mean * scale)
    torch.testing.assert_close(std, torch.exp(0.5 * net_logvar) * scale)
    # ... in raw units: the elite mean tracks the true next states per dimension within a
    # small fraction of that dimension's spread (dimension 1's spread is 100 x smaller).
    nxt, rewards = model.mean_step(obs, act)
    truth = torch.as_tensor(test.next_observations)
    err = (nxt - truth).abs().mean(0) / truth.std(0)
    assert rewards is None and (err < 0.1).all(), err
    # It has no reward head: the MOPO path (rewards from the model) is refused, clearly.
    with pytest.raises(ValueError, match="no reward head"):
        model.step(obs, act)
    with pytest.raises(ValueError, match="no reward head"):
        model.open_loop(obs, act[:, None], with_rewards=True)


# --- item 6: reward model, EDM init and the last weights --------------------------------------

def _reward_dataset(n=600, seed=0):
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n, 3)).astype(np.float32)
    act = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    rew = (obs[:, 0] - act[:, 1] ** 2 + 0.3 * rng.normal(size=n)).astype(np.float32)
    z = np.zeros(n, bool)
    return Dataset(obs, act, rew, obs, z, z, name="hopper-reward")


def test_item6_paper_reward_model_has_edm_init_and_keeps_the_last_weights(paper, tmp_path):
    cfg = paper_model(paper, "reward")
    assert (cfg["weight_init"], cfg["keep"]) == ("edm", "last")
    small = {**cfg, "hidden": [32, 32], "lr": 0.03, "eval_every": 5, "train_steps": 60}
    runs = {}
    for keep in ("last", "best"):
        out = tmp_path / keep
        summary = train_reward_model(_reward_dataset(), {**small, "keep": keep}, out, seed=0,
                                     progress=False, device="cpu")
        rows = pd.read_parquet(out / "metrics.parquet")
        runs[keep] = (summary, rows, torch.load(out / "model.pt", weights_only=True)["model"])
    (last, rows, w_last), (best, _, w_best) = runs["last"], runs["best"]
    assert last["best_step"] != last["steps"] == 60  # so last and best differ
    # keep last: the weights of the last evaluation; keep best: those of the best one.
    assert last["kept_holdout_mse"] == rows["holdout_mse"].iloc[-1] > rows["holdout_mse"].min()
    assert best["kept_holdout_mse"] == rows["holdout_mse"].min() == best["holdout_mse"]
    assert not all(torch.equal(w_last[k], w_best[k]) for k in w_last)
    # EDM Linear init: weights sqrt(1 / fan_in) N(0, 1), biases 0.
    from dydiff.reward_model import RewardModel
    torch.manual_seed(0)
    net = RewardModel(11, 3, [256, 256], "edm").net
    linears = [m for m in net if isinstance(m, nn.Linear)]
    for layer in linears:
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
        assert abs(float(layer.weight.detach().std()) * math.sqrt(layer.in_features) - 1) < 0.05


# --- item 7: batch split, kept count, z-score eps, probability floor --------------------------

def test_item7_paper_batch_split_and_softmax_filter_are_the_authors(paper):
    policy = paper_policy(paper)
    off = from_dict(OfflineConfig, policy["offline"])
    assert (off.batch_size, off.real_ratio, off.n_real) == (256, 0.6, 153)  # int: 153 + 103
    rollout = from_dict(DyDiffConfig, policy["rollout"])
    assert (rollout.keep_rule, rollout.zscore_eps, rollout.prob_floor) == ("int", 1e-6, 1e-6)
    returns = torch.randn(2048, generator=torch.Generator().manual_seed(0))
    keep = filter_trajectories(returns, rollout.threshold, "softmax", rollout.temp,
                               torch.Generator().manual_seed(1), rollout.keep_rule,
                               rollout.zscore_eps, rollout.prob_floor)
    assert len(keep) == 1228 == int(0.6 * 2048)  # round would keep 1229
    # The probabilities are the authors' (rlkit/trainer.py:225-227), in float64.
    r = returns.double().numpy()
    z = (r - r.mean()) / (r.std() + 1e-6)
    e = np.exp(z / rollout.temp - (z / rollout.temp).max())
    want = e / e.sum() * (1 - 1e-6) + 1e-6 / len(r)
    got = torch.softmax(softmax_filter_logits(returns, rollout.temp, rollout.zscore_eps,
                                              rollout.prob_floor), 0).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got.min() >= 1e-6 / len(r) * (1 - 1e-9)  # the floor: every trajectory can be kept
    unfloored = torch.softmax(softmax_filter_logits(returns, rollout.temp), 0)
    assert float(unfloored.min()) < 1e-6 / len(r)  # without it, not (the test can fail)
