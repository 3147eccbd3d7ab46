"""Faster EDM samplers (issue 16): DPM-Solver++(2M), deterministic Heun, warm-started injection,
and the `sampler: fast` preset."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from harness.config import ConfigError, from_dict
from dydiff.diffusion import DiffusionConfig, build_denoiser, load_diffusion, train_diffusion
from dydiff.rollout import DyDiffConfig
from dydiff.sampler import (SAMPLER_PRESETS, DiffusionDynamics, SamplerConfig, edm_sample,
                            sampler_config)
from dydiff.segments import Normalizer
from test_diffusion import TINY, ConstantDenoiser, toy_dataset

FAST = {"solver": "dpmpp2m", "num_steps": 10, "S_churn": 0.0}
SOLVERS = {"authors": {}, "heun-det": {"S_churn": 0.0, "num_steps": 10}, "dpmpp2m": FAST,
           "dpmpp2m_sde": {**FAST, "solver": "dpmpp2m_sde"},
           "dpmpp2m-warm": {**FAST, "warm_start": True, "warm_sigma": 1.0}}


class GaussianDenoiser(nn.Module):
    """The exact denoiser of independent N(mu, s^2) entries: D(x; sigma) = mu + s^2 /
    (s^2 + sigma^2) (x - mu). Its probability-flow ODE from x(sigma_max) ends at
    x(0) = mu + s / sqrt(s^2 + sigma_max^2) (x(sigma_max) - mu)."""

    def __init__(self, mu: torch.Tensor, s: torch.Tensor):
        super().__init__()
        self.mu, self.s = mu, s

    def forward(self, x, sigma):
        sigma = torch.as_tensor(sigma, dtype=x.dtype)
        return self.mu + self.s ** 2 / (self.s ** 2 + sigma ** 2) * (x - self.mu)


def _conditioned_free(shape, obs_dim, n_actions):
    free = torch.ones(shape[1:], dtype=torch.bool)
    free[0, :obs_dim], free[:n_actions, obs_dim:] = False, False
    return free


@pytest.mark.parametrize("name", ["heun-det", "dpmpp2m", "dpmpp2m_sde"])
def test_new_solvers_reach_a_point_mass_and_keep_conditioning_exactly(name):
    torch.manual_seed(0)
    c = torch.randn(1, 6, 5)
    start, acts = torch.randn(4, 3), torch.randn(4, 4, 2)
    cfg = sampler_config(SOLVERS[name])
    x = edm_sample(ConstantDenoiser(c), (4, 6, 5), 3, start, acts, cfg)
    assert torch.equal(x[:, 0, :3], start) and torch.equal(x[:, :4, 3:], acts)
    free = _conditioned_free(x.shape, 3, 4)
    assert torch.allclose(x[:, free], c.expand(4, -1, -1)[:, free], atol=1e-5)


def test_warm_start_keeps_conditioning_exactly_and_runs_only_the_low_levels():
    torch.manual_seed(0)
    c = torch.randn(1, 6, 5)
    start, acts, warm = torch.randn(4, 3), torch.randn(4, 6, 2), 5 * torch.randn(4, 6, 5)
    cfg = sampler_config(SOLVERS["dpmpp2m-warm"])
    calls = []
    den = ConstantDenoiser(c)
    den.register_forward_pre_hook(lambda m, args: calls.append(float(args[1])))
    x = edm_sample(den, (4, 6, 5), 3, start, acts, cfg, warm=warm)
    assert torch.equal(x[:, 0, :3], start) and torch.equal(x[:, :, 3:], acts)
    free = _conditioned_free(x.shape, 3, 6)
    assert torch.allclose(x[:, free], c.expand(4, -1, -1)[:, free], atol=1e-5)
    # From warm_sigma down: warm_sigma, then the 10-step schedule's 4 levels below 1
    # (0.47, 0.117, 0.020, 0.002).
    assert calls[0] == pytest.approx(1.0) and all(s < 1.0 for s in calls[1:])
    assert calls[1] == pytest.approx(0.46998, rel=1e-4)
    assert len(calls) == cfg.network_evaluations(warm=True) == 5
    assert cfg.network_evaluations() == 10
    assert SamplerConfig().network_evaluations() == 67  # the authors': 34 Heun steps


def _dynamics(sampler: dict, denoiser=None, horizon=8):
    torch.manual_seed(0)
    cfg = from_dict(DiffusionConfig, {**TINY, "horizon": horizon})
    norm = Normalizer("limits", np.full(5, 0.5, np.float32), np.full(5, 2.0, np.float32))
    return DiffusionDynamics(denoiser or build_denoiser(cfg, 5), norm, 3, 2, horizon,
                             sampler_config(sampler))


class TanhPolicy:
    def __init__(self):
        self.K = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))

    def act(self, obs, deterministic=True):
        return torch.tanh(obs @ self.K)


@pytest.mark.parametrize("warm_first", [False, True])
def test_warm_started_injection_counts_its_evaluations_and_inpaints_exactly(warm_first):
    sampler = {**SOLVERS["dpmpp2m-warm"], "warm_first": warm_first}
    dyn = _dynamics(sampler)
    calls = []
    dyn.denoiser.register_forward_pre_hook(lambda *_: calls.append(1))
    start = torch.randn(6, 3)
    out = dyn.inject(start, TanhPolicy(), iterative_times=2, init="diffusion")
    # init (an action-free sample: always full), then K = 2 injections: warm where enabled.
    cfg = dyn.sampler
    full, warm = cfg.network_evaluations(), cfg.network_evaluations(warm=True)
    assert len(calls) == full + (warm if warm_first else full) + warm
    assert torch.equal(out["states"][:, 0], start)
    # The returned trajectory's actions are the injected ones, exactly (sample inpaints raw).
    torch.manual_seed(3)
    states, acts = dyn.sample(start, out["cond_actions"], warm=out["states"])
    assert torch.equal(states[:, 0], start) and torch.equal(acts, out["cond_actions"])
    with pytest.raises(ValueError, match="all 8 rows"):
        dyn.sample(start, out["cond_actions"][:, :3], warm=out["states"])


@pytest.mark.parametrize("name", list(SOLVERS))
def test_same_seed_same_numbers(name):
    dyn = _dynamics(SOLVERS[name])
    start = torch.randn(5, 3)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(dyn.inject(start, TanhPolicy(), iterative_times=2, init="policy"))
    assert torch.equal(runs[0]["states"], runs[1]["states"])
    assert runs[0]["action_gap"] == runs[1]["action_gap"]
    torch.manual_seed(8)
    other = dyn.inject(start, TanhPolicy(), iterative_times=2, init="policy")
    assert not torch.equal(other["states"], runs[0]["states"])


def test_deterministic_solvers_converge_to_the_exact_ode_solution_and_to_each_other():
    """Gaussian data, exact denoiser: the ODE's endpoint is known in closed form. With many
    steps Heun (S_churn 0) and DPM-Solver++(2M) reach it, at second order."""
    torch.manual_seed(0)
    mu, s = torch.randn(1, 6, 5), 0.2 + torch.rand(1, 6, 5)
    den = GaussianDenoiser(mu, s)
    start = mu[:, 0, :3].expand(8, -1)  # conditioning on the mean: the other entries unchanged

    def run(solver, steps):
        cfg = sampler_config({"solver": solver, "num_steps": steps, "S_churn": 0.0})
        g = torch.Generator().manual_seed(1)
        return edm_sample(den, (8, 6, 5), 3, start, None, cfg, g)

    z = torch.randn((8, 6, 5), generator=torch.Generator().manual_seed(1)) * 80.0
    exact = mu + s / (s ** 2 + 80.0 ** 2).sqrt() * (z - mu)
    exact[:, 0, :3] = start
    err = {(solver, n): float((run(solver, n) - exact).abs().max())
           for solver in ("heun", "dpmpp2m") for n in (4, 20, 40, 200)}
    assert err[("heun", 200)] < 1e-3 and err[("dpmpp2m", 200)] < 1e-3
    assert float((run("heun", 200) - run("dpmpp2m", 200)).abs().max()) < 1e-3
    for solver in ("heun", "dpmpp2m"):
        assert err[(solver, 4)] > 10 * err[(solver, 200)]
        # Second order: doubling the steps cuts the error ~4x (measured 4.4 and 4.7; a
        # first-order solver, e.g. DPM-Solver++ without its multistep term, halves it).
        assert err[(solver, 20)] > 3 * err[(solver, 40)]


# --- presets -------------------------------------------------------------------------------

def test_sampler_presets_resolve_and_a_mapping_still_works():
    fast = from_dict(DiffusionConfig, {"sampler": "fast"}, where="models.diffusion").sampler
    assert fast == from_dict(SamplerConfig, SAMPLER_PRESETS["fast"])
    assert fast.solver == "dpmpp2m" and fast.S_churn == 0 and fast.warm_start
    assert fast.network_evaluations() * 5 <= SamplerConfig().network_evaluations()
    assert from_dict(DiffusionConfig, {"sampler": "authors"}).sampler == SamplerConfig()
    assert from_dict(DiffusionConfig, {}).sampler == SamplerConfig()  # the paper default
    mapping = from_dict(DiffusionConfig, {"sampler": {"num_steps": 10}}).sampler
    assert mapping == SamplerConfig(num_steps=10)
    with pytest.raises(ConfigError, match=r"models.diffusion.sampler: unknown sampler preset "
                                          r"'quick'; known: \['authors', 'fast'\]"):
        from_dict(DiffusionConfig, {"sampler": "quick"}, where="models.diffusion")
    with pytest.raises(ConfigError, match="sampler.S_churn: solver 'dpmpp2m' has no churn"):
        from_dict(DiffusionConfig, {"sampler": {"solver": "dpmpp2m"}})
    with pytest.raises(ConfigError, match="policy.rollout.sampler: unknown sampler preset"):
        from_dict(DyDiffConfig, {"sampler": "quick"}, where="policy.rollout")


def test_load_diffusion_with_a_preset_keeps_the_stored_batch_size(tmp_path):
    cfg = {**TINY, "train_steps": 2, "log_every": 1, "checkpoint_every": 2,
           "sampler": {"num_steps": 6, "batch_size": 16}}
    train_diffusion(toy_dataset(), cfg, tmp_path, seed=0, progress=False, device="cpu")
    assert load_diffusion(tmp_path).sampler == SamplerConfig(num_steps=6, batch_size=16)
    fast = load_diffusion(tmp_path, "cpu", "fast").sampler
    assert fast == sampler_config({**SAMPLER_PRESETS["fast"], "batch_size": 16})
    assert load_diffusion(tmp_path, "cpu", "authors").sampler == SamplerConfig(batch_size=16)


def test_fast_sampler_variant_is_registered_outside_the_paper_grid():
    from harness import plan, registry
    for base in ("dydiff-td3bc", "dydiff-cql"):
        m = registry.method(f"{base}-fastsampler")
        assert m.base == base and m.overrides == {"rollout": {"sampler": "fast"}}
        assert m.ablation is None
    cfg = plan.load_config("config/paper.yaml")
    assert not any(name.endswith("-fastsampler") for name in cfg["methods"])
    rollout = plan.policy_job(cfg, "dydiff-td3bc", cfg["tasks"][0], 0)["config"]["policy"][
        "rollout"]
    assert rollout["sampler"] is None  # the paper protocol keeps the model's (authors') sampler
    cfg = plan.load_config("config/paper.yaml", {"methods": ["td3bc", "dydiff-td3bc",
                                                             "dydiff-td3bc-fastsampler"]})
    job = plan.policy_job(cfg, "dydiff-td3bc-fastsampler", cfg["tasks"][0], 0)
    assert job["config"]["policy"]["rollout"]["sampler"] == "fast"
    assert job["model_dirs"] == plan.policy_job(cfg, "dydiff-td3bc", cfg["tasks"][0],
                                                0)["model_dirs"]  # the same trained models
    assert math.isclose(from_dict(DiffusionConfig, {}).sampler.S_churn, 60.0)


def test_stochastic_dpmpp2m_samples_the_data_distribution():
    """SDE form, Gaussian data, exact denoiser: the samples' per-entry mean and std are the
    data's (a wrong noise scale or decay would shift the std)."""
    torch.manual_seed(0)
    mu, s = torch.randn(1, 4, 3), 0.2 + torch.rand(1, 4, 3)
    cfg = sampler_config({"solver": "dpmpp2m_sde", "num_steps": 60, "S_churn": 0.0})
    g = torch.Generator().manual_seed(1)
    x = edm_sample(GaussianDenoiser(mu, s), (4000, 4, 3), 1, mu[:, 0, :1].expand(4000, -1),
                   None, cfg, g)[:, 1:]
    assert torch.allclose(x.mean(0), mu[0, 1:], atol=0.05)
    assert torch.allclose(x.std(0), s[0, 1:], rtol=0.06)
    # The deterministic form maps noise to data too, through the ODE: same moments.
    det = edm_sample(GaussianDenoiser(mu, s), (4000, 4, 3), 1, mu[:, 0, :1].expand(4000, -1),
                     None, sampler_config({**FAST, "num_steps": 60}), g)[:, 1:]
    assert torch.allclose(det.std(0), s[0, 1:], rtol=0.06)
