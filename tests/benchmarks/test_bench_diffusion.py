"""Dynamics diffusion speed on CPU (one thread): training steps/s and sampled transitions/s.

'paper': horizon 100, U-Net dim 128 x (1, 4, 8) (~59M parameters), batch 8, 34 Heun steps.
'smoke': the recommended smoke preset (horizon 16, dim 32 x (1, 2), batch 64, 10 Heun steps).
The paired benchmarks time the former code paths (fd9d912: host-drawn batches copied each step,
one nan_to_num and one lerp_ per parameter, loss.item() per step, per-tensor Adam; levels read
back per sampler step), kept in tests/test_dydiff_equivalence.py as the equivalence reference,
against the current ones, alternating one call of each per round, and print the paired
speed-up (agents.flops.paired_speedup: mean former / mean current, 95 % bootstrap CI).
`test_sampler_authors_float64_cost` prices the paper default's float64 sampler the same way.
Run with:
    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/benchmarks/test_bench_diffusion.py \\
        --benchmark-enable --benchmark-only
"""
import copy
import time

import numpy as np
import pytest
import torch

from agents.flops import paired_speedup
from harness.config import from_dict
from harness.data.dataset import Dataset
from dydiff.segments import make_segments
from dydiff.sampler import DiffusionDynamics, edm_sample
from dydiff.diffusion import DiffusionConfig, build_denoiser, make_optimizer, train_step
from test_dydiff_equivalence import (FORMER_LOSS, FORMER_SAMPLER, former_edm_sample,
                                     former_optimizer, former_train_step)

O, A = 11, 3  # hopper sizes

PRESETS = {
    "paper": {},
    "smoke": {"horizon": 16, "dim": 32, "dim_mults": [1, 2], "batch_size": 64,
              "lr_rampup_kimg": 0.0, "ema_halflife_kimg": 10.0, "sampler": {"num_steps": 10}},
}
PAIRED_ROUNDS = {"smoke": 30, "paper": 10}
SAMPLE_ROUNDS = {"smoke": 8, "paper": 4}
RESULTS: dict = {}  # (what, preset) -> (speed-up, lo, hi, former s, current s)


@pytest.fixture(scope="module", autouse=True)
def table(request):
    yield
    if not RESULTS:
        return
    lines = [f"{'benchmark':28s} {'former':>10s} {'current':>10s} {'paired speed-up [95% CI]':>26s}"]
    for (what, preset), (r, lo, hi, f, c) in RESULTS.items():
        lines.append(f"{what + ', ' + preset:28s} {f * 1e3:8.2f}ms {c * 1e3:8.2f}ms "
                     f"{r:>10.3f}x [{lo:.3f}, {hi:.3f}]")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + "\n".join(lines))


def _paired(benchmark, key, fns, rounds):
    """Alternate one call of each side per round (`fns[side](k)`, round 0 warms up), then
    record the paired speed-up of `current` over `former` (mean time ratio, 95 % CI). Times
    are the process's CPU time: one thread, so other jobs on a shared machine do not inflate
    them as they do wall time."""
    times = {"former": [], "current": []}
    if benchmark.disabled:  # `make test` (--benchmark-disable): one timed round, a smoke check
        rounds = 1

    def run():
        for k in range(rounds + 1):
            for side in ("former", "current") if k % 2 else ("current", "former"):
                t0 = time.process_time()
                fns[side](k)
                if k:
                    times[side].append(time.process_time() - t0)

    benchmark.pedantic(run, rounds=1, iterations=1)
    f, c = np.array(times["former"]), np.array(times["current"])
    r, lo, hi = paired_speedup(f, c)
    RESULTS[key] = (r, lo, hi, f.mean(), c.mean())
    benchmark.extra_info.update(paired_speedup=r, ci=[lo, hi])


def _dataset(n=3000):
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(n, O)).astype(np.float32)
    timeouts = np.zeros(n, bool)
    timeouts[499::500] = True
    nxt = np.roll(obs, -1, 0)
    return Dataset(obs, rng.uniform(-1, 1, (n, A)).astype(np.float32),
                   np.zeros(n, np.float32), nxt, np.zeros(n, bool), timeouts, name="hopper-bench")


def _cfg(preset, former_semantics=False):
    over = dict(PRESETS[preset])
    if former_semantics:  # the computation both sides of a paired benchmark run
        over.update(FORMER_LOSS)
        over["sampler"] = {**over.get("sampler", {}), **FORMER_SAMPLER}
    return from_dict(DiffusionConfig, over)


@pytest.mark.benchmark(group="diffusion-train")
@pytest.mark.parametrize("preset", ["smoke", "paper"])
def test_train_steps_per_second(benchmark, preset):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = _cfg(preset)
    segments = make_segments(_dataset(), cfg.horizon)
    denoiser, ema = build_denoiser(cfg, O + A), build_denoiser(cfg, O + A)
    opt = make_optimizer(denoiser.parameters(), cfg)
    state = {"step": 0}

    def step():
        loss = train_step(denoiser, ema, opt, segments, state["step"], cfg)
        state["step"] += 1
        return loss

    loss = benchmark.pedantic(step, rounds=3 if preset == "paper" else 10, iterations=1,
                              warmup_rounds=1)
    assert np.isfinite(float(loss))


@pytest.mark.benchmark(group="diffusion-train-paired")
@pytest.mark.parametrize("preset", ["smoke", "paper"])
def test_train_step_paired_speedup(benchmark, preset):
    """One former and one current training step per round on twin models (same weights,
    same seed stream), alternating."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = _cfg(preset, former_semantics=True)
    segments = make_segments(_dataset(), cfg.horizon)
    den = build_denoiser(cfg, O + A)
    twins = {}
    for side in ("former", "current"):
        d = copy.deepcopy(den)
        e = copy.deepcopy(den).requires_grad_(False)
        opt = (former_optimizer(d.parameters(), cfg) if side == "former"
               else make_optimizer(d.parameters(), cfg))
        twins[side] = (d, e, opt)
    fns = {"former": lambda k: former_train_step(*twins["former"], segments, k, cfg),
           "current": lambda k: float(train_step(*twins["current"], segments, k, cfg))}
    _paired(benchmark, ("train step", preset), fns, PAIRED_ROUNDS[preset])


@pytest.mark.benchmark(group="diffusion-sample")
@pytest.mark.parametrize("preset,n", [("smoke", 256), ("paper", 2)])
def test_sampler_transitions_per_second(benchmark, preset, n):
    """One action-conditioned sample of n trajectories (transitions = n * (horizon - 1));
    a DyDiff rollout with iterative_times 2 costs 3 such samples."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = _cfg(preset)
    segments = make_segments(_dataset(), cfg.horizon)
    dyn = DiffusionDynamics(build_denoiser(cfg, O + A), segments.normalizer, O, A, cfg.horizon,
                            cfg.sampler)
    start, actions = torch.randn(n, O), torch.rand(n, cfg.horizon, A) * 2 - 1
    states, _ = benchmark.pedantic(dyn.sample, args=(start, actions), rounds=1, iterations=1)
    benchmark.extra_info["transitions_per_call"] = n * (cfg.horizon - 1)
    assert states.shape == (n, cfg.horizon, O) and torch.isfinite(states).all()


@pytest.mark.benchmark(group="diffusion-sample-paired")
@pytest.mark.parametrize("preset,n", [("smoke", 256), ("paper", 2)])
def test_sampler_paired_speedup(benchmark, preset, n):
    """The former and the current edm_sample on the same model and inputs, alternating (same
    computation: the former sampler's float32, churn-conditioned settings on both sides)."""
    if preset == "paper" and benchmark.disabled:
        pytest.skip("paper size: timing only (run with --benchmark-enable)")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = _cfg(preset, former_semantics=True)
    den = build_denoiser(cfg, O + A).eval().requires_grad_(False)
    start, actions = torch.randn(n, O), torch.rand(n, cfg.horizon, A) * 2 - 1
    shape = (n, cfg.horizon, O + A)
    fns = {side: (lambda k, f=f: f(den, shape, O, start, actions, cfg.sampler,
                                    torch.Generator().manual_seed(k)))
           for side, f in (("former", former_edm_sample), ("current", edm_sample))}
    _paired(benchmark, ("sample", preset), fns, SAMPLE_ROUNDS[preset])


@pytest.mark.benchmark(group="diffusion-sample-paired")
@pytest.mark.parametrize("preset,n", [("smoke", 256), ("paper", 2)])
def test_sampler_authors_float64_cost(benchmark, preset, n):
    """The price of the authors' sampler semantics (issue 26 item 1): edm_sample with the
    paper default (float64 updates around the float32 network, churned x_hat unconditioned)
    as `current` against the former float32, churn-conditioned settings as `former`; a ratio
    below 1 is the cost of fidelity."""
    if preset == "paper" and benchmark.disabled:
        pytest.skip("paper size: timing only (run with --benchmark-enable)")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    authors, former = _cfg(preset).sampler, _cfg(preset, former_semantics=True).sampler
    den = build_denoiser(_cfg(preset), O + A).eval().requires_grad_(False)
    horizon = _cfg(preset).horizon
    start, actions = torch.randn(n, O), torch.rand(n, horizon, A) * 2 - 1
    shape = (n, horizon, O + A)
    fns = {side: (lambda k, c=c: edm_sample(den, shape, O, start, actions, c,
                                            torch.Generator().manual_seed(k)))
           for side, c in (("former", former), ("current", authors))}
    _paired(benchmark, ("sample float64 vs float32", preset), fns, SAMPLE_ROUNDS[preset])
