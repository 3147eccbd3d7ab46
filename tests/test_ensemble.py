"""Probabilistic ensemble: vectorised layers, bounded logvar, NLL training on a known system,
early stopping / elites, exact resume, the dynamics-model interface, config validation."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baselines.ensemble import DyDiffEnsembleConfig, EnsembleConfig, EnsembleLinear, \
    EnsembleNet, dataset_tensors, load_ensemble, make_optimizer, member_mse, split_indices, \
    train_ensemble
from harness.config import ConfigError, from_dict
from harness.data.dataset import Dataset

NOISE = 0.05
A = np.array([[0.9, 0.2], [-0.2, 0.9]], np.float32)
B = np.array([[0.0, 0.5]], np.float32)
SMALL = dict(num_members=3, num_elites=2, hidden=[32, 32], weight_decay=[0.0, 0.0, 0.0],
             batch_size=64)


def linear_system(n=3000, noise=NOISE, seed=0) -> Dataset:
    """s' = A s + B a + N(0, noise^2), r = s_0 - a^2 + N(0, noise^2) on uniform (s, a)."""
    rng = np.random.default_rng(seed)
    obs = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    act = rng.uniform(-1, 1, (n, 1)).astype(np.float32)
    nxt = obs @ A.T + act @ B + noise * rng.standard_normal((n, 2)).astype(np.float32)
    rew = obs[:, 0] - act[:, 0] ** 2 + noise * rng.standard_normal(n).astype(np.float32)
    done = np.zeros(n, bool)
    return Dataset(obs, act, rew, nxt, done, done, name="toy-linear")


def true_step(obs, act):
    return obs @ torch.as_tensor(A).T + act @ torch.as_tensor(B)


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_ensemble")
    logged = []
    summary = train_ensemble(linear_system(), {**SMALL, "max_epochs": 30}, out, seed=0,
                             progress=False, device="cpu",
                             log_fn=lambda m, step: logged.append((step, m)))
    return out, summary, logged


def state(path):
    return torch.load(path / "model.pt", weights_only=True)["model"]


# ---- network ----------------------------------------------------------------------------------

def test_member_forward_equals_plain_linear_stack():
    torch.manual_seed(0)
    cfg = from_dict(EnsembleConfig, {**SMALL, "num_members": 4})
    net = EnsembleNet(5, 3, cfg)
    net.input_norm.mean.copy_(torch.randn(5))
    net.input_norm.std.copy_(torch.rand(5) + 0.5)
    x = torch.randn(10, 5)
    mean, logvar = net(x)
    assert mean.shape == logvar.shape == (4, 10, 3)
    for e in range(4):
        layers = []
        for i, layer in enumerate(net.layers):
            lin = nn.Linear(*layer.weight.shape[1:])
            lin.weight.data.copy_(layer.weight[e].T)
            lin.bias.data.copy_(layer.bias[e, 0])
            layers += [lin] + ([nn.SiLU()] if i < len(net.layers) - 1 else [])
        out = nn.Sequential(*layers)((x - net.input_norm.mean) / net.input_norm.std)
        m, lv = out.chunk(2, -1)
        lv = net.max_logvar[0, 0] - F.softplus(net.max_logvar[0, 0] - lv)
        lv = net.min_logvar[0, 0] + F.softplus(lv - net.min_logvar[0, 0])
        torch.testing.assert_close(mean[e], m, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logvar[e], lv, rtol=1e-5, atol=1e-5)
    # a per-member batch (E, B, in) runs member e on its own rows
    xs = torch.randn(4, 6, 5)
    per_member, _ = net(xs)
    for e in range(4):
        torch.testing.assert_close(per_member[e], net(xs[e])[0][e])


def test_ensemble_linear_init_and_independent_members():
    torch.manual_seed(0)
    layer = EnsembleLinear(3, 200, 50)
    std = 1 / (2 * 200 ** 0.5)
    assert layer.weight.abs().max() <= 2 * std + 1e-7
    assert abs(layer.weight.std().item() - std) < 0.15 * std
    x = torch.randn(3, 4, 200, requires_grad=True)
    layer(x)[1].sum().backward()
    assert x.grad[0].abs().sum() == 0 and x.grad[2].abs().sum() == 0  # member 1 only


def test_logvar_stays_within_learned_bounds():
    torch.manual_seed(0)
    net = EnsembleNet(3, 2, from_dict(EnsembleConfig, SMALL))
    with torch.no_grad():
        net.max_logvar.fill_(0.3)
        net.min_logvar.fill_(-4.0)
    x = torch.randn(500, 3) * 1000  # extreme inputs push the raw logvar far out
    _, logvar = net(x)
    # PETS soft bounds: min + softplus(max - min) = max + log(1 + e^-(max - min)) on top
    upper = -4.0 + F.softplus(torch.tensor(4.3)).item()
    assert logvar.max() <= upper + 1e-6 and logvar.min() >= -4.0
    assert logvar.max() > upper - 1e-3 and logvar.min() < -4.0 + 1e-3  # both are reached


# ---- training ---------------------------------------------------------------------------------

def test_nll_decreases_and_learned_std_matches_true_noise(toy_model):
    out, summary, _ = toy_model
    rows = pd.read_parquet(out / "metrics.parquet")
    assert list(rows.columns) == ["epoch", "train_loss", "holdout_mse", "holdout_mse_elites",
                                  "wall_time_s"]
    assert rows["epoch"].tolist() == list(range(1, summary["epochs"] + 1))
    assert rows["train_loss"].iloc[-1] < rows["train_loss"].iloc[0] - 5.0
    # holdout MSE reaches the noise floor (sigma^2 = 0.0025), far below "next = current"
    assert summary["holdout_mse_elites"] < 2 * NOISE ** 2
    assert summary["holdout_mse_trivial"] > 20 * summary["holdout_mse_elites"]
    model = load_ensemble(out)
    ds = linear_system(500, seed=1)
    _, std = model.predict(ds.observations, ds.actions)
    learned = std[model.elites].mean().item()
    assert abs(learned - NOISE) < 0.25 * NOISE, learned


def test_elites_are_lowest_holdout_members(toy_model):
    out, summary, _ = toy_model
    ds = linear_system()
    x, y = dataset_tensors(ds)
    _, hold = split_indices(len(x), from_dict(EnsembleConfig, SMALL), seed=0)
    model = load_ensemble(out)
    mse = member_mse(model.net, x[hold], y[hold])
    np.testing.assert_allclose(mse.numpy(), summary["holdout_mse"], rtol=1e-5)
    assert summary["elites"] == sorted(mse.argsort()[:2].tolist())
    assert model.elites.tolist() == summary["elites"]


def test_log_fn_gets_prefixed_epoch_metrics(toy_model):
    _, summary, logged = toy_model
    assert [s for s, _ in logged] == list(range(1, summary["epochs"] + 1))
    assert set(logged[0][1]) == {"ensemble_train_loss", "ensemble_holdout_mse",
                                 "ensemble_holdout_mse_elites", "ensemble_wall_time_s"}


def test_early_stopping_and_best_snapshots(tmp_path):
    # lr 0 after the first epoch: nothing improves, so training stops after patience epochs
    ds = linear_system(600)
    s = train_ensemble(ds, {**SMALL, "lr": 1e-12, "patience": 2}, tmp_path, seed=0,
                       progress=False, device="cpu")
    assert s["epochs"] == 3  # epoch 1 sets the bests, epochs 2-3 do not improve by 1 %


def test_holdout_split_rule():
    cfg = EnsembleConfig()
    assert len(split_indices(1_000_000, cfg, seed=0)[1]) == 5000  # capped at max_holdout
    train, hold = split_indices(1000, cfg, seed=3)
    assert len(hold) == 200 and len(train) == 800
    assert sorted(torch.cat([train, hold]).tolist()) == list(range(1000))
    again, _ = split_indices(1000, cfg, seed=3)
    assert torch.equal(train, again)
    with pytest.raises(ValueError, match="too small"):
        split_indices(3, cfg, seed=0)


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    ds = linear_system(800)
    cfg = {**SMALL, "max_epochs": 2}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train_ensemble(ds, cfg, tmp_path / name, seed=seed, progress=False, device="cpu")
    a, b, c = (state(tmp_path / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.weight"], c["layers.0.weight"])


@pytest.mark.parametrize("recipe", [EnsembleConfig, DyDiffEnsembleConfig])
def test_kill_and_resume_equals_uninterrupted(tmp_path, recipe):
    """MOPO's recipe and the DyDiff authors' (epoch permutations, Adam's weight decay groups,
    constant logvar bounds, keep last) resume to the same weights."""
    ds = linear_system(800)
    as_cfg = lambda d: from_dict(recipe, d)  # noqa: E731
    cfg = as_cfg({**SMALL, "max_epochs": 5, "checkpoint_every": 2})
    full = train_ensemble(ds, cfg, tmp_path / "full", seed=0, progress=False, device="cpu")
    part = train_ensemble(ds, cfg, tmp_path / "cut", seed=0, progress=False, device="cpu",
                          stop_at=3)
    assert part == {"epochs": 3, "interrupted": True}
    assert not (tmp_path / "cut" / "model.pt").exists()
    resumed = train_ensemble(ds, cfg, tmp_path / "cut", seed=0, progress=False, device="cpu")
    a, b = state(tmp_path / "full"), state(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["holdout_mse"] == full["holdout_mse"] and resumed["epochs"] == 5
    ra = pd.read_parquet(tmp_path / "full" / "metrics.parquet")
    rb = pd.read_parquet(tmp_path / "cut" / "metrics.parquet")
    pd.testing.assert_frame_equal(ra.drop(columns="wall_time_s"), rb.drop(columns="wall_time_s"))
    # resuming a finished run changes nothing; a different config is refused
    again = train_ensemble(ds, cfg, tmp_path / "cut", seed=0, progress=False, device="cpu")
    assert again["holdout_mse"] == full["holdout_mse"]
    with pytest.raises(ValueError, match="different config"):
        train_ensemble(ds, as_cfg({**SMALL, "max_epochs": 5, "checkpoint_every": 2, "lr": 0.5}),
                       tmp_path / "cut", seed=0, progress=False)


def test_dydiff_recipe_init_weight_decay_groups_and_constant_logvar_bounds():
    """torch_3d: torch's kaiming_uniform_(a=sqrt(5)) on the (E, in, out) tensor, whose fan_in
    torch takes as in * out, so U(+-1 / sqrt(in * out)) for weights and biases; Adam's
    weight_decay per layer on weights and biases; the logvar bounds are not trained."""
    cfg = from_dict(DyDiffEnsembleConfig, SMALL)
    torch.manual_seed(0)
    net = EnsembleNet(5, 3, cfg)
    for layer in net.layers:
        _, fan_in, out = layer.weight.shape
        bound = 1 / math.sqrt(fan_in * out)
        ref = torch.empty_like(layer.weight)
        assert nn.init._calculate_fan_in_and_fan_out(ref)[0] == fan_in * out
        for p in (layer.weight, layer.bias):
            assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound
    opt = make_optimizer(net, cfg)
    assert [g["weight_decay"] for g in opt.param_groups] == cfg.weight_decay
    assert [len(g["params"]) for g in opt.param_groups] == [2] * len(net.layers)  # W and b
    assert "max_logvar" not in dict(net.named_parameters())
    assert "max_logvar" in net.state_dict()  # saved with the model, as a constant
    # MOPO's recipe: one group without weight decay (it is in the loss), bounds trained.
    mopo = EnsembleNet(5, 3, from_dict(EnsembleConfig, SMALL))
    groups = make_optimizer(mopo, from_dict(EnsembleConfig, SMALL)).param_groups
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0
    assert "max_logvar" in dict(mopo.named_parameters())


@pytest.mark.parametrize("override, key", [
    ({"num_elites": 8}, "models.ensemble.num_elites"),
    ({"num_members": 0}, "models.ensemble.num_members"),
    ({"hidden": []}, "models.ensemble.hidden"),
    ({"weight_decay": [1e-4, 1e-4]}, "models.ensemble.weight_decay"),
    ({"holdout_ratio": 1.0}, "models.ensemble.holdout_ratio"),
    ({"batch_size": 0}, "models.ensemble.batch_size"),
    ({"patience": 0}, "models.ensemble.patience"),
    ({"max_epochs": 0}, "models.ensemble.max_epochs"),
    ({"lr": "fast"}, "models.ensemble.lr"),
    ({"elites": 3}, "unknown key(s) ['elites']"),
])
def test_bad_config_names_the_key(override, key, tmp_path):
    with pytest.raises(ConfigError) as err:
        train_ensemble(linear_system(100), override, tmp_path, progress=False)
    assert key in str(err.value)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_paper_defaults():
    cfg = from_dict(EnsembleConfig, {})
    assert (cfg.num_members, cfg.num_elites, cfg.hidden) == (7, 5, [200] * 4)
    assert cfg.weight_decay == [2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4]
    assert (cfg.lr, cfg.batch_size, cfg.holdout_ratio, cfg.max_holdout, cfg.patience) == (
        1e-3, 256, 0.2, 5000, 5)
    assert cfg.sampling == "bootstrap"  # MOPO bnn.py:405, OfflineRL-Kit ensemble_dynamics.py:129


def test_members_train_on_bootstrap_samples():
    """Rows drawn with replacement per member (so duplicates occur and ~1/e of rows are left
    out of each member), different per member, the same for the same seed; `permutation`
    gives every member every row."""
    from baselines.ensemble import member_rows
    rows = member_rows(7, 5000, "bootstrap", seed=3)
    assert rows.shape == (7, 5000) and rows.min() >= 0 and rows.max() < 5000
    distinct = torch.tensor([len(torch.unique(r)) for r in rows], dtype=torch.float32)
    assert (distinct < 5000).all()                                  # duplicates occur
    assert ((distinct / 5000 - (1 - math.exp(-1))).abs() < 0.02).all()  # ~63.2 % distinct
    assert all(not torch.equal(rows[0], rows[i]) for i in range(1, 7))  # per-member samples
    assert torch.equal(rows, member_rows(7, 5000, "bootstrap", seed=3))
    perm = member_rows(3, 100, "permutation", seed=3)
    assert all(torch.equal(torch.sort(r).values, torch.arange(100)) for r in perm)


# ---- the trained model ------------------------------------------------------------------------

def test_load_roundtrip_and_predict_units(toy_model):
    out, _, _ = toy_model
    model = load_ensemble(out)
    assert (model.obs_dim, model.act_dim, model.name, model.num_members) == (2, 1, "toy-linear",
                                                                           3)
    ds = linear_system(50, seed=2)
    mean, std = model.predict(ds.observations, ds.actions)
    assert mean.shape == std.shape == (3, 50, 3) and (std > 0).all()
    raw, logvar = model.net(torch.cat([torch.as_tensor(ds.observations),
                                       torch.as_tensor(ds.actions)], 1))
    torch.testing.assert_close(mean[..., :2], raw[..., :2] + torch.as_tensor(ds.observations))
    torch.testing.assert_close(std, torch.exp(0.5 * logvar))
    truth = true_step(torch.as_tensor(ds.observations), torch.as_tensor(ds.actions))
    assert (mean[model.elites, :, :2] - truth).abs().mean() < NOISE
    with pytest.raises(ValueError, match="obs/act dims 2/1"):
        model.predict(torch.zeros(4, 3), torch.zeros(4, 1))
    empty = model.step(torch.zeros(0, 2), torch.zeros(0, 1))
    assert empty["next_obs"].shape == (0, 2) and empty["stds"].shape == (3, 0, 3)
    with pytest.raises(FileNotFoundError, match="train-model --model ensemble"):
        load_ensemble(out / "missing")


def test_step_samples_one_elite_per_row(toy_model):
    model = load_ensemble(toy_model[0])
    obs, act = torch.rand(400, 2) * 2 - 1, torch.rand(400, 1) * 2 - 1
    out = model.step(obs, act, torch.Generator().manual_seed(0), deterministic=True)
    assert out["next_obs"].shape == (400, 2) and out["rewards"].shape == (400,)
    assert out["stds"].shape == out["means"].shape == (3, 400, 3)
    full = torch.cat([out["next_obs"], out["rewards"][:, None]], 1)
    match = (out["means"] == full).all(-1)  # (E, N): which member each row came from
    assert match.sum(0).min() >= 1
    chosen = match.float().argmax(0)
    assert set(chosen.tolist()) == set(model.elites.tolist())  # only elites, all of them used
    # stochastic: reproducible for a seeded generator, noise scale = the chosen member's std
    a = model.step(obs, act, torch.Generator().manual_seed(1))
    b = model.step(obs, act, torch.Generator().manual_seed(1))
    assert torch.equal(a["next_obs"], b["next_obs"])
    assert 0.5 * NOISE < (a["next_obs"] - out["next_obs"]).std() < 2 * NOISE


def test_open_loop_tracks_the_true_system(toy_model):
    model = load_ensemble(toy_model[0])
    g = torch.Generator().manual_seed(0)
    start = torch.rand(64, 2, generator=g) * 1.4 - 0.7
    actions = torch.rand(64, 8, 1, generator=g) * 0.6 - 0.3
    pred = model.open_loop(start, actions.double())  # float64 actions are accepted
    assert pred.shape == (64, 8, 2) and pred.dtype == torch.float32
    s, truth = start, []
    for t in range(8):
        s = true_step(s, actions[:, t])
        truth.append(s)
    truth = torch.stack(truth, 1)
    err = (pred - truth).square().mean((0, 2))
    drift = (truth - start[:, None]).square().mean((0, 2))
    assert err[-1] < 0.05 * drift[-1], (err, drift)
    both = model.open_loop(start, actions, with_rewards=True)
    assert torch.equal(both["next_obs"], pred) and both["rewards"].shape == (64, 8)


class LinearPolicy:
    def act(self, obs, deterministic=True):
        assert deterministic
        return torch.tanh(obs[:, :1] - obs[:, 1:2])


def test_policy_rollout_matches_open_loop_on_its_actions(toy_model):
    model = load_ensemble(toy_model[0])
    start = torch.rand(16, 2) - 0.5
    roll = model.policy_rollout(start, LinearPolicy(), 6)
    assert roll["obs"].shape == roll["next_obs"].shape == (16, 6, 2)
    assert roll["actions"].shape == (16, 6, 1) and roll["rewards"].shape == (16, 6)
    assert torch.equal(roll["obs"][:, 0], start)
    assert torch.equal(roll["obs"][:, 1:], roll["next_obs"][:, :-1])
    torch.testing.assert_close(roll["actions"], LinearPolicy().act(roll["obs"].reshape(-1, 2))
                               .reshape(16, 6, 1))
    torch.testing.assert_close(model.open_loop(start, roll["actions"]), roll["next_obs"])


def test_hopper_holdout_beats_trivial_predictor(hopper_random, tmp_path):
    s = train_ensemble(hopper_random, {"max_epochs": 10}, tmp_path, seed=0, progress=False,
                       device="cpu")
    assert len(s["holdout_mse"]) == 7 and len(s["elites"]) == 5
    assert s["holdout_mse_elites"] < 0.6 * s["holdout_mse_trivial"]
    assert s["holdout_obs_mse_elites"] < 0.6 * s["holdout_obs_mse_trivial"]
