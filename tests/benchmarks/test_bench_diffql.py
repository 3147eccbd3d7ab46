"""Per-update cost of Diffusion-QL next to TD3+BC (CPU, one thread, batch 256, hopper-sized
17 / 6 dimensions), paired: each round times one update of every agent back to back, so what
the machine does during a round hits all of them; the ratio to TD3+BC has a 95 % bootstrap CI
over rounds (agents/flops.paired_speedup), next to the ratio of matmul FLOPs (agents/flops.py).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/benchmarks/test_bench_diffql.py \\
        --benchmark-enable --benchmark-only

Agents: TD3+BC as the paper grid runs it (CORL's, 2 x 256; its cycle is two updates, one with
the actor step: an even number of rounds); Diffusion-QL as the original runs it on
hopper-medium (diffql-wang: T = 5 chain Q term, 3 x 256 Mish critics, grad-norm 9); the DyDiff
authors' DiffQL (diffql / dydiff-diffql: one-step x0-hat Q term, 2 x 256 ReLU critics).
"""
import time

import numpy as np
import pytest
import torch

from agents.diffql import DiffQL, DiffQLConfig
from agents.flops import paired_speedup, timing_batch, update_flops
from agents.td3bc import TD3BC, TD3BCConfig
from harness import registry

B, O, A = 256, 17, 6
ROUNDS = 30  # even: TD3+BC's actor step in every other round
AGENTS = {  # name -> builder
    "td3bc": lambda: TD3BC(O, A, TD3BCConfig()),
    "diffql-wang": lambda: DiffQL(O, A, DiffQLConfig(**{**registry.DIFFQL_PRESETS["wang"],
                                                        "grad_norm": 9.0})),
    "diffql-authors": lambda: DiffQL(O, A, DiffQLConfig(**registry.DIFFQL_PRESETS[
        "dydiff-authors"])),
}


@pytest.mark.benchmark(group="diffql-paired")
def test_diffql_update_cost_next_to_td3bc(benchmark, request):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    agents = {name: build() for name, build in AGENTS.items()}
    batch = timing_batch(B, O, A)
    times = {name: [] for name in agents}

    def round_of_all():
        for name, agent in agents.items():
            t0 = time.perf_counter()
            info = agent.update(batch)
            times[name].append(time.perf_counter() - t0)
            assert all(np.isfinite(v) for v in info.values()), name

    warmup = 2
    benchmark.pedantic(round_of_all, rounds=ROUNDS, iterations=1, warmup_rounds=warmup)
    if benchmark.stats is None:  # --benchmark-disable (the test suite): ran once
        return
    base = np.array(times["td3bc"][warmup:])
    flops = {name: update_flops(agent, B) for name, agent in agents.items()}
    lines = [f"{'agent':15s} {'ms/update':>9s} {'GFLOP/upd':>9s} {'x TD3+BC [95% CI]':>22s} "
             f"{'FLOPs x':>8s}"]
    for name in agents:
        t = np.array(times[name][warmup:])
        ratio, lo, hi = paired_speedup(t, base)
        benchmark.extra_info[name] = {"ms": t.mean() * 1e3, "flops": flops[name],
                                      "ratio_to_td3bc": [ratio, lo, hi]}
        lines.append(f"{name:15s} {t.mean() * 1e3:9.2f} {flops[name] / 1e9:9.3f} "
                     f"{ratio:8.2f} [{lo:5.2f}, {hi:5.2f}] {flops[name] / flops['td3bc']:8.2f}")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + "\n".join(lines))
