"""DyDiff generation speed on CPU (one thread): the authors' sampler vs the `fast` preset, side
by side (group dydiff-generation).

One generation = `DiffusionDynamics.inject` as the DyDiff generator calls it: the ensemble's
closed-loop policy rollout as s^0, then K = 2 injections (authors' stochastic Heun, 34 steps,
from pure noise each; `fast`: dydiff/sampler.py SAMPLER_PRESETS), at the smoke and paper
network sizes (test_bench_diffusion.py PRESETS; untrained networks: speed only; the paper
ensemble shape, 7 x 4 x 200, untrained). extra_info: transitions per call, transitions/s,
network evaluations per trajectory and, on the `fast` row, the ratio to the authors' row.
Run: .venv/bin/python -m pytest tests/benchmarks/test_bench_sampler.py --benchmark-enable
     --benchmark-only
Without --benchmark-enable (the normal test run) the paper size is skipped (tens of seconds).
Accuracy of the presets: scripts/sampler_study.py, docs/sampler-study.md.
"""
import numpy as np
import pytest
import torch

from agents.sac import SAC
from baselines.ensemble import EnsembleConfig, EnsembleDynamics, EnsembleNet
from harness.config import from_dict
from dydiff.diffusion import DiffusionConfig, build_denoiser
from dydiff.sampler import DiffusionDynamics, Limits, sampler_config
from dydiff.segments import Normalizer
from test_bench_diffusion import PRESETS

O, A = 11, 3  # hopper sizes
K = 2         # the authors' iterative_times
SPEED: dict[tuple[str, str], float] = {}  # (preset, sampler) -> transitions/s, for the ratio


def _generation(preset: str, sampler: str, n: int):
    torch.manual_seed(0)
    cfg = from_dict(DiffusionConfig, PRESETS[preset])
    norm = Normalizer("limits", np.zeros(O + A, np.float32), np.full(O + A, 2.0, np.float32))
    dyn = DiffusionDynamics(build_denoiser(cfg, O + A), norm, O, A, cfg.horizon,
                            sampler_config(sampler))
    ens_cfg = EnsembleConfig()
    ensemble = EnsembleDynamics(EnsembleNet(O + A, O + 1, ens_cfg),
                                list(range(ens_cfg.num_elites)), O, A, "hopper-bench")
    limits = Limits(torch.full((O,), -2.0), torch.full((O,), 2.0), torch.full((A,), -1.0),
                    torch.ones(A))
    agent, start = SAC(O, A), torch.randn(n, O)

    def run():
        torch.manual_seed(1)
        with torch.inference_mode():
            return dyn.inject(start, agent, K, True, "ensemble", limits=limits,
                              ensemble=ensemble)
    return dyn, run


@pytest.mark.benchmark(group="dydiff-generation")
@pytest.mark.parametrize("preset,n,sampler", [  # authors first: the ratio's base
    ("smoke", 256, "authors"), ("smoke", 256, "fast"), ("paper", 4, "authors"),
    ("paper", 4, "fast")])
def test_injected_generation_transitions_per_second(benchmark, preset, n, sampler):
    if preset == "paper" and benchmark.disabled:
        pytest.skip("paper size: timing only (run with --benchmark-enable)")
    torch.set_num_threads(1)
    dyn, run = _generation(preset, sampler, n)
    count = {"runs": 0, "calls": 0}
    dyn.denoiser.register_forward_pre_hook(lambda *_: count.update(calls=count["calls"] + 1))

    def counted():
        count["runs"] += 1
        return run()

    out = benchmark.pedantic(counted, rounds=1 if preset == "paper" else 3, iterations=1,
                             warmup_rounds=0 if preset == "paper" else 1)
    assert torch.isfinite(out["states"]).all()
    # Ensemble start: K samples per trajectory, one batched network call per evaluation;
    # with `fast` the second one is warm-started.
    nfe = count["calls"] // count["runs"]
    cfg = dyn.sampler
    assert nfe == cfg.network_evaluations() + (K - 1) * cfg.network_evaluations(
        warm=cfg.warm_start)
    assert nfe == {"authors": 2 * 67, "fast": 10 + 5}[sampler]
    if benchmark.disabled:
        return
    transitions = n * (dyn.horizon - 1)
    SPEED[(preset, sampler)] = transitions / benchmark.stats.stats.min
    benchmark.extra_info.update(transitions_per_call=transitions, nfe_per_trajectory=nfe,
                                transitions_per_s=SPEED[(preset, sampler)])
    if sampler == "fast" and (preset, "authors") in SPEED:
        ratio = SPEED[(preset, "fast")] / SPEED[(preset, "authors")]
        benchmark.extra_info["speedup_vs_authors"] = ratio
        print(f"\n{preset}: fast / authors = {ratio:.1f}x transitions/s "
              f"({SPEED[(preset, 'fast')]:.1f} vs {SPEED[(preset, 'authors')]:.1f})")
