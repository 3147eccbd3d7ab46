"""`dydiff-bench estimate`: work items per job, the throughput table, the DAG's list schedule,
and the estimate of the tiny grid against the tiny DAG's measured job times."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from analysis import estimate as E
from dag_helpers import BIN, ROOT, TINY, step_seconds
from harness import plan
from harness.config import ConfigError

# The estimate of the tiny grid is within this factor of the tiny DAG's measured step times
# (both ways): the table was measured one job at a time, the DAG runs two at once on 2 CPUs,
# and a tiny job's step is mostly fixed costs (first use of the MLflow store, torch, files).
# Measured on the 2-CPU machine that made the table: estimate 80 s, DAG 131 s (1.6x) when the
# machine was otherwise idle, 246 s (3.1x) with another test suite running beside it.
TINY_FACTOR = 4.0


def _cost(step, seconds, threads=1, **spec):
    return E.JobCost({"step": step, **spec}, seconds, seconds, threads, False, [], [])


def test_schedule_runs_independent_jobs_side_by_side_and_chains_in_order():
    jobs = [_cost("train-model", 10, out=f"m{i}") for i in range(4)]
    assert E.schedule(jobs, slots=2, by_threads=True) == 20
    assert E.schedule(jobs, slots=4, by_threads=False) == 10
    chain = [_cost("train-model", 10, out="m", dataset="d"),
             _cost("train-policy", 5, out="p", model_dirs={"m": "m"}),
             _cost("evaluate", 1, out="p/eval.json", policy_dir="p")]
    assert E.schedule(chain, slots=8, by_threads=False) == 16
    # A 4-thread job on 2 cores takes both; the 1-thread job waits for it.
    wide = [_cost("train-model", 10, threads=4, out="a"), _cost("train-model", 3, out="b")]
    assert E.schedule(wide, slots=2, by_threads=True) == 13


def test_counts_follow_the_config():
    cfg = plan.load_config(TINY)
    spec = plan.policy_job(cfg, "dydiff-td3bc", "hopper-medium-replay", 0)
    items = {it.name: it for it in E.job_items(cfg, spec)}
    off = spec["config"]["policy"]["offline"]
    assert items["agent-update"].count == off["total_steps"] == 300
    # generator calls at steps 1, 101, 201: 3 x 16 start states
    assert items["rollout"].count == 3 * 16
    # 2 evaluations (steps 150, 300) x 1 episode x Hopper's 1000-step limit
    assert items["env-step"].count == 2 * 1 * 1000
    # A learning rate changes no work: same key; a wider network does.
    other = E.item("agent-update", {**E._settings(items["agent-update"]), "config": {
        **E._settings(items["agent-update"])["config"], "actor_lr": 1.0}}, 1)
    assert other.key == items["agent-update"].key
    wider = E.item("agent-update", {**E._settings(items["agent-update"]), "config": {
        **E._settings(items["agent-update"])["config"], "hidden": [64, 64]}}, 1)
    assert wider.key != items["agent-update"].key


def test_missing_measurements_are_named_with_the_command_that_adds_them(tmp_path):
    cfg = plan.load_config(TINY)
    n = len(E.missing_items(E.plan_costs(cfg, [])))
    assert n > 10
    with pytest.raises(ConfigError, match=rf"no measurement for {n} work item\(s\).*--measure"):
        E.estimate(cfg, config_name="tests/configs/tiny.yaml", table=tmp_path / "none.csv")


@pytest.mark.parametrize("config", ["config/smoke.yaml", "config/paper.yaml",
                                    "tests/configs/tiny.yaml"])
def test_the_committed_table_covers_the_shipped_configs(config):
    """A settings change that alters a job's work needs new rows (`--measure`)."""
    cfg = plan.load_config(ROOT / config)
    missing = E.missing_items(E.plan_costs(cfg, E.read_table()))
    assert not missing, sorted(f"{n} {k}" for n, k in missing)


def test_paper_estimate_on_the_slurm_profile():
    res = subprocess.run([str(BIN / "dydiff-bench"), "estimate", "--configfile",
                          "config/paper.yaml", "--profile", "slurm"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "| train_policy | 975 |" in out and "| train_model | 300 |" in out, out
    assert "Wall time with 100 jobs at once:" in out
    # paper.yaml runs DyDiff policies, diffusion training and the rollout-error study on GPUs;
    # the table has no GPU rows yet: "not measured", never CPU timings under the GPU heading
    policy = next(line for line in out.splitlines() if line.startswith("| train_policy |"))
    cells = [c.strip() for c in policy.strip("|").split("|")]
    assert cells[4] == "not measured" and float(cells[5].replace(",", "")) > 0, policy
    assert "have no GPU measurements in the table" in out


@pytest.mark.slow
def test_tiny_estimate_is_within_a_factor_of_the_tiny_dag(tiny_dag):
    results, cfg = tiny_dag
    costs = E.plan_costs(cfg, E.read_table())
    assert not E.missing_items(costs)
    # The runner's "finished in X s" is a job's step without process start-up.
    start = next(r["seconds"] for r in E.read_table() if r["item"] == "job-start")
    estimated = sum(c.seconds - start for c in costs)
    measured = sum(step_seconds(log) for log in Path(results).rglob("logs/**/*.log")
                   if "finished in" in log.read_text(errors="replace"))
    print(f"tiny DAG: estimated {estimated:.0f} s of job steps, measured {measured:.0f} s")
    assert measured / TINY_FACTOR <= estimated <= measured * TINY_FACTOR


def test_gpu_jobs_are_priced_from_gpu_rows_only():
    """A GPU job's torch work comes from GPU rows, its MuJoCo steps from CPU rows; without GPU
    rows its GPU-hours read "not measured" and its CPU timing stands in its own column."""
    cfg = plan.load_config(ROOT / "config/smoke.yaml", {"devices": {"policy": "cuda"}})
    rows = E.read_table()
    costs = E.plan_costs(cfg, rows)
    gpu_jobs = [c for c in costs if c.gpu]
    assert gpu_jobs and all(c.spec["step"] == "train-policy" for c in gpu_jobs)
    assert all(c.seconds is None and c.cpu_seconds > 0 for c in gpu_jobs)
    assert {it.name for c in gpu_jobs for it in c.missing_gpu} <= {"agent-update", "rollout"}
    text = E.report(cfg, costs, 2, True, rows, "smoke")
    assert "not measured" in text and "timed on CPU" in text
    # GPU rows at a tenth of the CPU seconds: the GPU-hours are those, the CPU column unchanged
    fake = [{**r, "device": "cuda", "seconds": r["seconds"] / 10} for r in rows
            if r["item"] in ("agent-update", "rollout")]
    priced = E.plan_costs(cfg, rows + fake)
    for before, after in zip(costs, priced):
        if after.gpu:
            assert after.seconds is not None and after.seconds < after.cpu_seconds
            assert after.cpu_seconds == pytest.approx(before.cpu_seconds)
        else:
            assert after.seconds == pytest.approx(before.seconds)
    measured = E.report(cfg, priced, 2, True, rows + fake, "smoke").partition(
        "GPU-hours by arithmetic")[0]  # the arithmetic table below is labelled "not measured"
    assert "not measured" not in measured


def test_arithmetic_gpu_hours_of_a_paper_dydiff_job_per_precision():
    """Issue 32's arithmetic, from torch's FLOP counter on the paper U-Net: 3.21 GFLOP a
    forward at horizon 100; one DyDiff-TD3BC job ~11.5 H100-hours fp32, ~3 tf32, ~1.8 bf16."""
    import json

    from analysis import arithmetic as A
    cfg = plan.load_config(ROOT / "config/paper.yaml")
    model = plan.model_job(cfg, "diffusion", "walker2d-medium", 0)["config"]["model"]
    assert A.unet_forward_flops(json.dumps(model, sort_keys=True), 17, 6) == \
        pytest.approx(3.21e9, rel=0.01)
    spec = plan.policy_job(cfg, "dydiff-td3bc", "walker2d-medium", 0)
    rollout = next(it for it in E.job_items(cfg, spec) if it.name == "rollout")
    assert A.denoiser_passes(E._settings(rollout)["rollout"], model) == 2 * 67
    gpu = [it for it in E.job_items(cfg, spec) if E.item_device(it, "cuda") != "cpu"]
    hours = {p: s / 3600 for p, s in A.gpu_seconds(gpu, "H100").items()}
    assert hours["fp32"] == pytest.approx(11.5, rel=0.05)
    assert hours["tf32"] == pytest.approx(3.0, rel=0.05)
    assert hours["bf16"] == pytest.approx(1.8, rel=0.05)
    # An item without a FLOP count leaves the job's arithmetic empty, not under-counted.
    ensemble = next(it for it in E.job_items(cfg, plan.model_job(cfg, "ensemble", "walker2d-medium",
                                                                 0)) if it.name == "ensemble-train")
    assert A.gpu_seconds(gpu + [ensemble]) is None


def test_arithmetic_gpu_hours_are_a_table_of_their_own():
    cfg = plan.load_config(ROOT / "config/smoke.yaml", {"devices": {"policy": "cuda"}})
    rows = E.read_table()
    text = E.report(cfg, E.plan_costs(cfg, rows), 2, True, rows, "smoke")
    measured, _, arithmetic = text.partition("GPU-hours by arithmetic, not measured")
    assert arithmetic and "H100-hours fp32" not in measured
    policy = next(line for line in measured.splitlines() if line.startswith("| train_policy |"))
    assert "not measured" in policy  # the measured table still has no GPU rows
    assert "| train_policy |" in arithmetic and "never added to it" in arithmetic
