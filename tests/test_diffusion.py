"""Dynamics diffusion: segments, EDM preconditioning/loss, Heun sampler, training, resume."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from harness.config import ConfigError, from_dict
from harness.data.dataset import Dataset
from dydiff.segments import Normalizer, make_segments
from dydiff.edm import EDMDenoiser, apply_conditioning, edm_loss
from dydiff.sampler import DiffusionDynamics, SamplerConfig, edm_sample, sigma_steps
from dydiff.diffusion import (DiffusionConfig, build_denoiser, ema_beta, ema_update,
                                    load_diffusion, lr_at, train_diffusion)
from dydiff.unet import TemporalUnet

TINY = {"horizon": 8, "dim": 16, "dim_mults": [1, 2], "batch_size": 32, "train_steps": 6,
        "lr_rampup_kimg": 0.0, "ema_halflife_kimg": 1.0, "log_every": 2, "checkpoint_every": 2,
        "sampler": {"num_steps": 6}}


def toy_dataset(n_eps: int = 12, length: int = 20, short: int = 4, seed: int = 0) -> Dataset:
    """Linear toy dynamics s' = 0.9 s + 0.1 [a, a0]; every 4th episode is `short` steps long."""
    rng = np.random.default_rng(seed)
    obs, act, nxt, tout = [], [], [], []
    for e in range(n_eps):
        steps = short if e % 4 == 0 else length
        s = rng.normal(size=3)
        for t in range(steps):
            a = np.tanh(rng.normal(size=2))
            s2 = 0.9 * s + 0.1 * np.array([a[0], a[1], a[0]])
            obs.append(s), act.append(a), nxt.append(s2), tout.append(t == steps - 1)
            s = s2
    f = lambda x: np.array(x, np.float32)  # noqa: E731
    return Dataset(f(obs), f(act), np.zeros(len(obs), np.float32), f(nxt),
                   np.zeros(len(obs), bool), np.array(tout), name="hopper-toy")


# --- segments ---------------------------------------------------------------------------------

def test_segments_windows_padding_and_mask():
    ds = toy_dataset()
    seg = make_segments(ds, horizon=8, padding="repeat")  # the former padding (variant)
    # Long episodes (20 steps -> 21 rows) give 14 windows each; short ones (4 -> 5 rows) one.
    assert len(seg) == 9 * 14 + 3 * 1
    x, mask = seg.batch(torch.arange(len(seg)))
    raw = seg.normalizer.unnormalize(x)
    # First window of episode 1 (rows 4.. of the dataset) reproduces the data exactly.
    first_long = 1  # episode 0 is short -> one window
    np.testing.assert_allclose(raw[first_long, :, :3], ds.observations[4:12], atol=1e-5)
    np.testing.assert_allclose(raw[first_long, :, 3:], ds.actions[4:12], atol=1e-5)
    # Short episode: 4 real actions, 5 real states (incl. the final next state), rest masked.
    assert mask[0, :, 0].tolist() == [1] * 5 + [0] * 3
    assert mask[0, :, 3].tolist() == [1] * 4 + [0] * 4
    np.testing.assert_allclose(raw[0, 4:, :3], np.repeat(ds.next_observations[3:4], 4, 0),
                               atol=1e-5)
    # 'limits' normalisation maps the data channels into [-1, 1].
    assert x[mask.bool()].abs().max() <= 1 + 1e-5


def test_normalizer_roundtrip_and_errors():
    data = np.random.default_rng(0).normal(3, 2, size=(100, 4)).astype(np.float32)
    data[:, 2] = 1.0  # constant channel must not divide by zero
    for kind in ("limits", "gaussian"):
        norm = Normalizer.fit(data, kind)
        z = norm.normalize(torch.as_tensor(data))
        assert torch.isfinite(z).all()
        np.testing.assert_allclose(norm.unnormalize(z).numpy(), data, atol=1e-4)
    with pytest.raises(ValueError, match="normalizer kind"):
        Normalizer.fit(data, "minmax")
    with pytest.raises(ValueError, match="horizon must be >= 2"):
        make_segments(toy_dataset(), horizon=1)


# --- network and EDM --------------------------------------------------------------------------

@pytest.mark.parametrize("horizon", [8, 11, 100])
def test_temporal_unet_shapes(horizon):
    net = TemporalUnet(5, dim=16, dim_mults=(1, 2, 4))
    y = net(torch.randn(3, horizon, 5), torch.randn(3))
    assert y.shape == (3, horizon, 5)


class ZeroNet(nn.Module):
    def forward(self, x, c_noise):
        return torch.zeros_like(x)


def test_edm_preconditioning_identities():
    d = EDMDenoiser(ZeroNet(), sigma_data=0.5)
    sigma = torch.logspace(-4, 2, 50)
    assert torch.allclose(d.loss_weight(sigma) * d.c_out(sigma) ** 2, torch.ones(50))
    assert torch.allclose(d.c_in(sigma) * (sigma ** 2 + 0.25).sqrt(), torch.ones(50))
    # c_skip + c_out^2 / sd^2 = 1: the skip and the network share the unit target variance.
    assert torch.allclose(d.c_skip(sigma) + d.c_out(sigma) ** 2 / 0.25, torch.ones(50))
    # s -> 0: D(x) -> x (nothing to denoise); s -> inf: D(x) -> sd * F (pure prediction).
    tiny, huge = torch.tensor(1e-5), torch.tensor(1e4)
    assert d.c_skip(tiny) == pytest.approx(1.0, abs=1e-8) and d.c_out(tiny) < 1e-4
    assert d.c_skip(huge) < 1e-8 and d.c_out(huge) == pytest.approx(0.5, rel=1e-6)
    assert d.c_noise(torch.tensor(math.e ** 4)) == pytest.approx(1.0)
    x = torch.randn(4, 6, 3)
    for s in (0.01, 1.0, 30.0):
        assert torch.allclose(d(x, s), d.c_skip(torch.tensor(s)) * x)


def test_edm_loss_uses_lognormal_sigma_and_skips_conditioned_entries():
    torch.manual_seed(0)
    x0 = torch.randn(16, 6, 5)
    mask = torch.ones_like(x0)

    class Probe(nn.Module):  # records what the network sees
        def forward(self, x, c_noise):
            self.x, self.c_noise = x, c_noise
            return torch.zeros_like(x)
    probe = Probe()
    d = EDMDenoiser(probe)
    loss = edm_loss(d, x0, mask, obs_dim=3, action_cond_prob=1.0, loss_form="masked_mean")
    sigma = (probe.c_noise * 4).exp()
    # The first state and all actions are clean in the (c_in-scaled) input.
    c_in = d.c_in(sigma)[:, None]
    assert torch.allclose(probe.x[:, 0, :3], c_in * x0[:, 0, :3], atol=1e-6)
    assert torch.allclose(probe.x[:, :, 3:], c_in[:, None] * x0[:, :, 3:], atol=1e-6)
    # With a zero network D = c_skip x; the loss over generated entries only (states t >= 1).
    s = sigma[:, None, None]
    noisy_states = probe.x[:, 1:, :3] / d.c_in(s)
    err = d.loss_weight(s) * (d.c_skip(s) * noisy_states - x0[:, 1:, :3]) ** 2
    assert loss.item() == pytest.approx(err.mean().item(), rel=1e-5)


def test_apply_conditioning_partial_actions_and_rows():
    x = torch.zeros(3, 5, 4)
    s0, acts = torch.ones(3, 2), torch.full((3, 2, 2), 7.0)
    y = apply_conditioning(x, 2, s0, acts, action_rows=torch.tensor([True, False, True]))
    assert (y[:, 0, :2] == 1).all() and (x == 0).all()  # out of place
    assert (y[[0, 2], :2, 2:] == 7).all() and (y[1, :, 2:] == 0).all() and (y[:, 2:, 2:] == 0).all()


# --- sampler ----------------------------------------------------------------------------------

def test_sigma_steps_karras_schedule():
    cfg = SamplerConfig()
    t = sigma_steps(cfg)
    assert len(t) == 35 and t[-1] == 0
    assert t[0].item() == pytest.approx(80.0) and t[-2].item() == pytest.approx(0.002, rel=1e-5)
    assert (t[1:] < t[:-1]).all()


class ConstantDenoiser(nn.Module):
    """D(x; sigma) = c: the exact denoiser of a point mass at c."""

    def __init__(self, c: torch.Tensor):
        super().__init__()
        self.c = c

    def forward(self, x, sigma):
        return self.c.expand_as(x)


def test_heun_sampler_reaches_point_mass_and_keeps_conditioning_exactly():
    torch.manual_seed(0)
    c = torch.randn(1, 6, 5)
    start, acts = torch.randn(4, 3), torch.randn(4, 4, 2)
    x = edm_sample(ConstantDenoiser(c), (4, 6, 5), 3, start, acts, SamplerConfig(num_steps=10))
    assert torch.equal(x[:, 0, :3], start) and torch.equal(x[:, :4, 3:], acts)
    free = torch.ones(6, 5, dtype=torch.bool)
    free[0, :3], free[:4, 3:] = False, False
    assert torch.allclose(x[:, free], c.expand(4, -1, -1)[:, free], atol=1e-5)


def _tiny_dynamics(seed=0, horizon=8):
    torch.manual_seed(seed)
    cfg = from_dict(DiffusionConfig, {**TINY, "horizon": horizon})
    norm = Normalizer("limits", np.full(5, 0.5, np.float32), np.full(5, 2.0, np.float32))
    return DiffusionDynamics(build_denoiser(cfg, 5), norm, 3, 2, horizon, cfg.sampler)


def test_dynamics_sample_inpaints_raw_values_and_is_deterministic():
    dyn = _tiny_dynamics()
    start, acts = torch.randn(5, 3), torch.randn(5, 3, 2)
    torch.manual_seed(1)
    s1, a1 = dyn.sample(start, acts)
    torch.manual_seed(1)
    s2, a2 = dyn.sample(start, acts)
    assert torch.equal(s1, s2) and torch.equal(a1, a2)
    assert torch.equal(s1[:, 0], start) and torch.equal(a1[:, :3], acts)
    assert s1.shape == (5, 8, 3) and a1.shape == (5, 8, 2)
    with pytest.raises(ValueError, match="actions must be"):
        dyn.sample(start, torch.randn(5, 9, 2))


def test_open_loop_chains_windows():
    dyn = _tiny_dynamics(horizon=5)
    nxt = dyn.open_loop(torch.randn(2, 3), torch.randn(2, 10, 2))
    assert nxt.shape == (2, 10, 3) and torch.isfinite(nxt).all()


# --- training ---------------------------------------------------------------------------------

def test_ema_update_formula_and_schedules():
    net, ema = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.clone() for p in ema.parameters()]
    ema_update(ema, net, 0.9)
    for p0, p_ema, p in zip(before, ema.parameters(), net.parameters()):
        assert torch.allclose(p_ema, 0.9 * p0 + 0.1 * p)
    cfg = DiffusionConfig()  # batch 8, half-life 500 kimg, ramp-up 0.05
    assert ema_beta(0, cfg) == 0.0  # first update copies the weights
    assert ema_beta(10, cfg) == pytest.approx(0.5 ** (8 / (10 * 8 * 0.05)))
    assert ema_beta(10 ** 7, cfg) == pytest.approx(0.5 ** (8 / 500_000))
    assert lr_at(0, cfg) == pytest.approx(1e-3 * 8 / 1e7)
    assert lr_at(2 * 10 ** 6, cfg) == pytest.approx(1e-3)


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="models.diffusion.dim"):
        from_dict(DiffusionConfig, {"dim": 12}, where="models.diffusion")
    with pytest.raises(ConfigError, match="sampler.num_steps"):
        from_dict(DiffusionConfig, {"sampler": {"num_steps": 0}})
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(DiffusionConfig, {"horizn": 10})


def test_loss_decreases_on_toy_data(tmp_path):
    # The former loss (masked mean; the authors' per-sample sum: tests/test_dydiff_deviations.py)
    cfg = {**TINY, "train_steps": 150, "log_every": 25, "checkpoint_every": 150,
           "loss_form": "masked_mean", "padding": "repeat", "action_cond_prob": 0.9}
    summary = train_diffusion(toy_dataset(), cfg, tmp_path, seed=0, progress=False,
                              device="cpu")
    m = pd.read_parquet(tmp_path / "metrics.parquet")
    assert list(m.columns) == ["step", "loss", "lr", "wall_time_s"] and len(m) == 6
    assert m["loss"].iloc[-1] < 0.8 * m["loss"].iloc[0]
    assert summary["steps"] == 150
    dyn = load_diffusion(tmp_path, "cpu", sampler={"num_steps": 4})
    assert dyn.sampler.num_steps == 4 and dyn.horizon == 8 and dyn.obs_dim == 3


def test_resume_equals_uninterrupted(tmp_path):
    ds = toy_dataset()
    train_diffusion(ds, TINY, tmp_path / "a", seed=3, progress=False, device="cpu")
    # Interrupted after 4 steps (the checkpoint is at step 4), then restarted for all 6.
    train_diffusion(ds, {**TINY, "train_steps": 4}, tmp_path / "b", seed=3, progress=False,
                    device="cpu")
    train_diffusion(ds, TINY, tmp_path / "b", seed=3, progress=False, device="cpu")
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    ma, mb = (pd.read_parquet(tmp_path / d / "metrics.parquet") for d in "ab")
    pd.testing.assert_frame_equal(ma.drop(columns="wall_time_s"), mb.drop(columns="wall_time_s"))
    # A different seed gives different weights (the test can fail).
    train_diffusion(ds, TINY, tmp_path / "c", seed=4, progress=False, device="cpu")
    c = torch.load(tmp_path / "c" / "model.pt", weights_only=True)
    assert not all(torch.equal(a["ema"][k], c["ema"][k]) for k in a["ema"])


def test_stop_at_then_resume_equals_uninterrupted(tmp_path):
    ds = toy_dataset()
    full = train_diffusion(ds, TINY, tmp_path / "a", seed=3, progress=False, device="cpu")
    # Pre-empted at step 3 (between the checkpoints at 2 and 4), then restarted.
    part = train_diffusion(ds, TINY, tmp_path / "b", seed=3, progress=False, device="cpu",
                           stop_at=3)
    assert part == {"steps": 3, "interrupted": True}
    assert not (tmp_path / "b" / "model.pt").exists()
    resumed = train_diffusion(ds, TINY, tmp_path / "b", seed=3, progress=False, device="cpu")
    assert resumed["final_loss"] == full["final_loss"]
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    # A longer run may continue it; another config or seed may not.
    with pytest.raises(ConfigError, match="different diffusion config"):
        train_diffusion(ds, {**TINY, "lr": 1e-2}, tmp_path / "b", seed=3, progress=False)
    with pytest.raises(ConfigError, match="different diffusion seed"):
        train_diffusion(ds, TINY, tmp_path / "b", seed=4, progress=False)
