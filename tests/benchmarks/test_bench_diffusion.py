"""Dynamics diffusion speed on CPU (one thread): training steps/s and sampled transitions/s.

'paper': horizon 100, U-Net dim 128 x (1, 4, 8) (~59M parameters), batch 8, 34 Heun steps.
'smoke': the recommended smoke preset (horizon 16, dim 32 x (1, 2), batch 64, 10 Heun steps).
Run with: .venv/bin/python -m pytest tests/benchmarks/test_bench_diffusion.py --benchmark-enable
"""
import numpy as np
import pytest
import torch

from harness.config import from_dict
from harness.data.dataset import Dataset
from dydiff.segments import make_segments
from dydiff.sampler import DiffusionDynamics
from dydiff.diffusion import DiffusionConfig, build_denoiser, train_step

O, A = 11, 3  # hopper sizes

PRESETS = {
    "paper": {},
    "smoke": {"horizon": 16, "dim": 32, "dim_mults": [1, 2], "batch_size": 64,
              "lr_rampup_kimg": 0.0, "ema_halflife_kimg": 10.0, "sampler": {"num_steps": 10}},
}


def _dataset(n=3000):
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(n, O)).astype(np.float32)
    timeouts = np.zeros(n, bool)
    timeouts[499::500] = True
    nxt = np.roll(obs, -1, 0)
    return Dataset(obs, rng.uniform(-1, 1, (n, A)).astype(np.float32),
                   np.zeros(n, np.float32), nxt, np.zeros(n, bool), timeouts, name="hopper-bench")


@pytest.mark.benchmark(group="diffusion-train")
@pytest.mark.parametrize("preset", ["smoke", "paper"])
def test_train_steps_per_second(benchmark, preset):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = from_dict(DiffusionConfig, PRESETS[preset])
    segments = make_segments(_dataset(), cfg.horizon)
    denoiser, ema = build_denoiser(cfg, O + A), build_denoiser(cfg, O + A)
    opt = torch.optim.Adam(denoiser.parameters(), lr=cfg.lr)
    state = {"step": 0}

    def step():
        loss = train_step(denoiser, ema, opt, segments, state["step"], cfg)
        state["step"] += 1
        return loss

    loss = benchmark.pedantic(step, rounds=3 if preset == "paper" else 10, iterations=1,
                              warmup_rounds=1)
    assert np.isfinite(loss)


@pytest.mark.benchmark(group="diffusion-sample")
@pytest.mark.parametrize("preset,n", [("smoke", 256), ("paper", 2)])
def test_sampler_transitions_per_second(benchmark, preset, n):
    """One action-conditioned sample of n trajectories (transitions = n * (horizon - 1));
    a DyDiff rollout with iterative_times 2 costs 3 such samples."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = from_dict(DiffusionConfig, PRESETS[preset])
    segments = make_segments(_dataset(), cfg.horizon)
    dyn = DiffusionDynamics(build_denoiser(cfg, O + A), segments.normalizer, O, A, cfg.horizon,
                            cfg.sampler)
    start, actions = torch.randn(n, O), torch.rand(n, cfg.horizon, A) * 2 - 1
    states, _ = benchmark.pedantic(dyn.sample, args=(start, actions), rounds=1, iterations=1)
    benchmark.extra_info["transitions_per_call"] = n * (cfg.horizon - 1)
    assert states.shape == (n, cfg.horizon, O) and torch.isfinite(states).all()
