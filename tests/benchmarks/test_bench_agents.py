"""Agent updates at batch 256 (CPU, one thread): the former formulation next to the current
one, at paper and smoke sizes, with matmul FLOPs per update (agents/flops.py) and the GFLOP/s
achieved next to this machine's single-thread matmul rate (a chain of 256 x 256 @ 256 x 256
float32 matmuls, the batch shape of the updates), and a floor: the time of the current
update's matmuls alone (its exact shapes, preallocated outputs, nothing else). A third
benchmark runs the two formulations alternately, one update of each per round, and gives
their paired speed-up with a bootstrap CI over rounds: on a shared machine the separate
timings drift by 10-30 % between runs, the paired ratio much less. A table is printed at the
end of the module.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/benchmarks/test_bench_agents.py \\
        --benchmark-enable --benchmark-only

The former formulation is the reference of tests/test_agent_equivalence.py (which checks both
give the same update); sizes come from the configs: TD3+BC and SAC are 2 x 256 in both
(config/smoke.yaml does not shrink them), CQL is 3 x 256 with N = 10 as its dataclass default
(OfflineRL-Kit; cql-corl has the same sizes), 2 x 256 with N = 10 in config/paper.yaml's
`policy.cql` (the DyDiff authors'), and 2 x 256 with N = 4 in config/smoke.yaml.
"""
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from agents.flops import paired_speedup, timing_batch, update_flops, update_matmuls
from test_agent_equivalence import O, A, make, paper_section, reference

B = 256
ROOT = Path(__file__).resolve().parents[2]
SMOKE = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())["policy"]
CASES = {  # name -> (agent, settings, sizes)
    "td3bc": ("td3bc", {}, "paper = smoke: 2x256"),
    "sac": ("sac", {**paper_section("sac"), "actor_lr_schedule_steps": 3_000_000},
            "paper = smoke: 2x256"),
    "cql": ("cql", {}, "paper (default): 3x256, N=10"),
    "cql-paper.yaml": ("cql", paper_section("cql"), "paper.yaml: 2x256, N=10"),
    "cql-smoke": ("cql", SMOKE["cql"], "smoke: 2x256, N=4"),
}
ROUNDS = {"td3bc": 40, "sac": 40, "cql": 10, "cql-paper.yaml": 16, "cql-smoke": 20}
RESULTS: dict = {}  # (case, formulation) -> (mean seconds, FLOPs); "matmul" -> GFLOP/s;
#                     (case, "floor") -> seconds per update of its matmuls alone (min);
#                     (case, "paired") -> (speed-up, CI low, CI high) from alternating rounds


@pytest.fixture(scope="module", autouse=True)
def table(request):
    """Print the comparison once the module's benchmarks have run."""
    yield
    peak = RESULTS.get("matmul")
    if not RESULTS or peak is None:
        return
    lines = [f"single-thread float32 matmul (256x256 @ 256x256 chain): {peak:.1f} GFLOP/s",
             "FLOP ms: the update's FLOPs at that rate; floor ms: its matmuls alone, timed; "
             "at floor: the former's time / floor (the speed-up with no time outside matmuls)",
             f"{'agent':15s} {'sizes':28s} {'formulation':11s} {'ms/update':>9s} "
             f"{'GFLOP/upd':>9s} {'GFLOP/s':>7s} {'% peak':>6s} {'FLOP ms':>7s} {'floor ms':>8s} "
             f"{'speed-up':>8s} {'at floor':>8s} {'paired [95% CI]':>19s}"]
    for case, (_, _, sizes) in CASES.items():
        for form in ("former", "new"):
            if (case, form) not in RESULTS:
                continue
            sec, flops = RESULTS[case, form]
            rate = flops / sec / 1e9
            floor = RESULTS.get((case, "floor")) if form == "new" else None
            former = RESULTS.get((case, "former"), (None,))[0] if form == "new" else None
            paired = RESULTS.get((case, "paired")) if form == "new" else None
            cells = [f"{floor * 1e3:8.2f}" if floor else "",
                     f"{former / sec:.2f}x" if former else "",
                     f"{former / floor:.2f}x" if former and floor else "",
                     "{:.2f}x [{:.2f}, {:.2f}]".format(*paired) if paired else ""]
            lines.append(f"{case:15s} {sizes:28s} {form:11s} {sec * 1e3:9.2f} {flops / 1e9:9.3f} "
                         f"{rate:7.1f} {100 * rate / peak:6.0f} {flops / peak / 1e6:7.2f} "
                         f"{cells[0]:>8s} {cells[1]:>8s} {cells[2]:>8s} {cells[3]:>19s}")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():  # shown without -s as well
        print("\n" + "\n".join(lines))


@pytest.fixture
def batch():
    return timing_batch(B, O, A)


@pytest.mark.benchmark(group="matmul")
def test_matmul_chain(benchmark):
    """The machine's single-thread float32 matmul rate at the updates' shape: 8 chained
    (256, 256) @ (256, 256) products."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 256, generator=g)
    weights = [torch.randn(256, 256, generator=g) / 16 for _ in range(8)]

    def chain():
        h = x
        for w in weights:
            h = h @ w
        return h

    benchmark.pedantic(chain, rounds=200, iterations=5, warmup_rounds=20)
    if benchmark.stats is None:  # --benchmark-disable (the test suite): ran once, no timing
        return
    flops = len(weights) * 2 * B * 256 * 256
    RESULTS["matmul"] = flops / benchmark.stats.stats.min / 1e9  # the attainable rate
    benchmark.extra_info.update(flops=flops, gflop_per_s=RESULTS["matmul"])


@pytest.mark.benchmark(group="agent-update")
@pytest.mark.parametrize("formulation", ["former", "new"])
@pytest.mark.parametrize("case", list(CASES))
def test_update_throughput(benchmark, case, formulation, batch):
    torch.set_num_threads(1)
    kind, settings, sizes = CASES[case]
    agent = make(kind, settings)
    update = reference(agent, record=False).update if formulation == "former" else agent.update
    flops = update_flops(agent, B, former=formulation == "former")
    info = benchmark.pedantic(update, args=(batch,), rounds=ROUNDS[case], iterations=1,
                              warmup_rounds=3)
    assert all(torch.isfinite(torch.tensor(v)) for v in info.values())
    if benchmark.stats is None:
        return
    sec = benchmark.stats.stats.mean  # TD3+BC: an even number of rounds, half with the actor
    RESULTS[case, formulation] = (sec, flops)
    benchmark.extra_info.update(sizes=sizes, flops=flops, gflop_per_s=flops / sec / 1e9)
    if "matmul" in RESULTS:
        benchmark.extra_info["fraction_of_matmul_peak"] = flops / sec / 1e9 / RESULTS["matmul"]


@pytest.mark.benchmark(group="matmul-floor")
@pytest.mark.parametrize("case", list(CASES))
def test_matmul_floor(benchmark, case):
    """The current update's matmuls alone (agents/flops.py's shapes, outputs preallocated;
    the fastest round): about the time no formulation with these matmuls beats here."""
    torch.set_num_threads(1)
    kind, settings, sizes = CASES[case]
    matmuls, updates = update_matmuls(make(kind, settings), B)
    g = torch.Generator().manual_seed(0)
    operands = [(torch.randn(m, k, generator=g), torch.randn(k, n, generator=g),
                 torch.empty(m, n)) for m, k, n in matmuls]

    def run():
        for x, w, out in operands:
            torch.mm(x, w, out=out)

    benchmark.pedantic(run, rounds=max(ROUNDS[case] // 2, 5), iterations=1, warmup_rounds=2)
    if benchmark.stats is None:
        return
    RESULTS[case, "floor"] = benchmark.stats.stats.min / updates  # attainable: the fastest
    benchmark.extra_info.update(sizes=sizes, seconds_per_update=RESULTS[case, "floor"])


@pytest.mark.benchmark(group="agent-update-paired")
@pytest.mark.parametrize("case", list(CASES))
def test_paired_speedup(benchmark, case, batch):
    """One former and one current update per round, alternating, on twin agents: whatever
    the machine does during a round hits both. Speed-up = the former's summed time over the
    current's; 95 % CI from resampling rounds (TD3+BC: both do their actor step in the same
    rounds)."""
    torch.set_num_threads(1)
    kind, settings, _ = CASES[case]
    updates = {"former": reference(make(kind, settings), record=False).update,
               "new": make(kind, settings).update}
    times = {name: [] for name in updates}

    def round_of_both():
        for name, update in updates.items():
            t0 = time.perf_counter()
            update(batch)
            times[name].append(time.perf_counter() - t0)

    warmup = 3
    benchmark.pedantic(round_of_both, rounds=ROUNDS[case], iterations=1, warmup_rounds=warmup)
    if benchmark.stats is None:
        return
    former, new = (np.array(times[name][warmup:]) for name in ("former", "new"))
    speedup, lo, hi = RESULTS[case, "paired"] = paired_speedup(former, new)
    benchmark.extra_info.update(paired_speedup=speedup, ci=[lo, hi])
