"""The speed levers (harness/levers.py): named settings in the job specs, recorded, and on a CPU
the same numbers as before where they must be (fp32, TF32 switches, compile off) and close
where bf16 autocast changes them; scripts/gpu_levers.py's dry run as the GPU check calls it."""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from harness import levers as L
from harness import plan
from harness.config import ConfigError, from_dict
from dydiff.diffusion import DiffusionConfig, build_denoiser, make_optimizer, train_step
from dydiff.sampler import SamplerConfig, edm_sample, network_call

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "config" / "smoke.yaml"
OBS, ACT = 3, 2
TINY = {"horizon": 8, "dim": 8, "dim_mults": [1, 2], "batch_size": 4, "lr_rampup_kimg": 0.0}


def test_defaults_are_the_authors_and_a_bad_value_names_its_key():
    assert L.Levers() == L.Levers("fp32", "tf32_conv", "fp32", False, False)
    with pytest.raises(ConfigError, match=r"^levers\.diffusion_train: 'fp16' is not one of"):
        L.parse({"diffusion_train": "fp16"})


def _specs(overrides=None) -> dict:
    cfg = plan.load_config(SMOKE, overrides)
    return {json.dumps([j["step"], j.get("model"), j.get("method"), j.get("task"),
                        j.get("seed")]): j for j in plan.all_jobs(cfg)}


def _changed(overrides) -> set[tuple]:
    base, other = _specs(), _specs({"levers": overrides})
    return {tuple(json.loads(k)[:3]) for k in base if base[k] != other[k]}


def test_default_levers_leave_every_spec_as_it_was():
    assert not any("levers" in j for j in _specs().values())
    assert _specs() == _specs({"levers": L.record()})  # every field, at its default


def test_a_lever_reruns_only_the_jobs_that_use_it():
    assert _changed({"diffusion_train": "bf16"}) == {("train-model", "diffusion", None)}
    assert _changed({"compile_train": True}) == {("train-model", "diffusion", None)}
    sampled = _changed({"diffusion_sample": "bf16"})
    assert sampled == {("rollout-error", None, None),
                       *{("train-policy", None, m) for m in ("dydiff-td3bc", "dydiff-cql")}}
    agents = _changed({"agents": "tf32"})
    assert {s for s, _, _ in agents} == {"train-policy"}
    assert {m for _, _, m in agents} == set(plan.load_config(SMOKE)["methods"])


def test_the_runner_tags_a_job_with_its_levers():
    from harness import runner
    try:
        L.use_levers({"diffusion_sample": "bf16"})
        tags = runner.tags({"step": "rollout-error", "task": "hopper-medium"})
        assert tags["levers.diffusion_sample"] == "bf16"
        assert tags["levers.diffusion_train"] == "fp32"
    finally:
        L.use_levers(None)
    assert L.levers() == L.Levers()


def test_tf32_flags_are_set_within_and_restored_after():
    cudnn, cublas = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.allow_tf32, cublas.allow_tf32
    for name, (conv, matmul, _) in L.PRECISIONS.items():
        with L.tf32_flags(name):
            assert (cudnn.allow_tf32, cublas.allow_tf32) == (conv, matmul)
        assert (cudnn.allow_tf32, cublas.allow_tf32) == before


@pytest.fixture(scope="module")
def tiny():
    cfg = from_dict(DiffusionConfig, TINY)
    torch.manual_seed(0)
    return cfg, build_denoiser(cfg, OBS + ACT).eval()


def _sample(denoiser, levers: dict, dtype="float64") -> torch.Tensor:
    cfg = SamplerConfig(num_steps=6, dtype=dtype)
    start = torch.linspace(-1, 1, 6 * OBS).reshape(6, OBS)
    acts = torch.linspace(-0.5, 0.5, 6 * 8 * ACT).reshape(6, 8, ACT)
    with L.using(levers):
        return edm_sample(denoiser, (6, 8, OBS + ACT), OBS, start, acts, cfg,
                          torch.Generator().manual_seed(3))


def test_fp32_tf32_and_compile_off_sample_bit_for_bit_as_the_default(tiny):
    _, net = tiny
    ref = _sample(net, {})  # the defaults: the sampler as it was (test_dydiff_equivalence)
    for levers in ({"diffusion_sample": "fp32"}, {"diffusion_sample": "tf32"},
                   {"compile_sample": False}):
        assert torch.equal(_sample(net, levers), ref), levers


def test_bf16_autocast_is_the_network_call_alone_and_stays_close(tiny):
    _, net = tiny
    seen = []
    hook = net.net.register_forward_pre_hook(
        lambda _m, args: seen.append((torch.is_autocast_enabled("cpu"), args[0].dtype)))
    try:
        out = _sample(net, {"diffusion_sample": "bf16"})
    finally:
        hook.remove()
    assert seen and all(on for on, _ in seen)  # inside every network call ...
    assert not torch.is_autocast_enabled("cpu")  # ... and nowhere after
    ref = _sample(net, {"diffusion_sample": "fp32"})
    assert out.dtype == torch.float32 and not torch.equal(out, ref)  # bf16 did run
    # Stated tolerances, ||bf16 - fp32|| / ||fp32||: bf16 keeps 8 bits of mantissa (2^-9 = 2e-3
    # relative rounding per op), compounded through the U-Net's ~20 layers: one network call
    # within 5e-2 (measured 2.4e-2), a whole sample (11 calls of the stochastic Heun solver,
    # each step feeding the next) within 1e-1 (measured 5.8e-2).
    assert float((out - ref).norm() / ref.norm()) < 1e-1
    x = torch.randn(6, 8, OBS + ACT, generator=torch.Generator().manual_seed(4))
    calls = {}
    for precision in ("fp32", "bf16"):
        with L.using({"diffusion_sample": precision}):
            with torch.no_grad():
                calls[precision] = network_call(net, torch.float64, "cpu")(x, torch.tensor(1.3))
    assert calls["bf16"].dtype == torch.float64  # cast back to the updates' dtype
    rel = float((calls["bf16"] - calls["fp32"]).norm() / calls["fp32"].norm())
    assert 0 < rel < 5e-2


@pytest.fixture(scope="module")
def hopper_tiny(hopper_random):
    """A tiny U-Net for Hopper's 11 + 3 channels and the segments it trains on."""
    from dydiff.segments import make_segments
    cfg = from_dict(DiffusionConfig, TINY)
    torch.manual_seed(0)
    return cfg, build_denoiser(cfg, 11 + 3), make_segments(hopper_random, cfg.horizon)


def _train(tiny, levers: dict, steps: int = 3):
    """Losses and final weights of `steps` training steps from the same weights and seed."""
    cfg, net, segments = tiny
    net, ema = copy.deepcopy(net).train(), copy.deepcopy(net).requires_grad_(False)
    opt = make_optimizer(net.parameters(), cfg)
    torch.manual_seed(5)
    with L.using(levers):
        losses = [float(train_step(net, ema, opt, segments, step, cfg))
                  for step in range(steps)]
    return losses, torch.cat([p.detach().flatten() for p in net.parameters()])


def test_training_fp32_tf32_and_compile_off_are_bit_for_bit_and_bf16_close(hopper_tiny):
    ref_losses, ref_w = _train(hopper_tiny, {})
    for levers in ({"diffusion_train": "tf32_conv"}, {"diffusion_train": "tf32"},
                   {"compile_train": False}):
        losses, w = _train(hopper_tiny, levers)
        assert losses == ref_losses and torch.equal(w, ref_w), levers
    losses, w = _train(hopper_tiny, {"diffusion_train": "bf16"})
    assert losses != ref_losses
    # Stated tolerances: each step's loss within 3 % of fp32's (measured 0.4, 1.4, 0.7 %: the
    # draws are the same, the forward rounds to bf16); the weights after 3 Adam steps within
    # 2e-2 of fp32's, ||w - w_fp32|| / ||w_fp32|| (measured 6.1e-3).
    assert all(abs(a - b) <= 3e-2 * abs(b) for a, b in zip(losses, ref_losses))
    assert float((w - ref_w).norm() / ref_w.norm()) < 2e-2


def test_compile_on_traces_the_same_function(hopper_tiny):
    """torch.compile's graph capture (the `eager` backend here: inductor's codegen takes ~85 s
    on one CPU core; the GPU check times inductor) keeps the losses and weights."""
    ref_losses, ref_w = _train(hopper_tiny, {}, steps=2)
    backend, L.COMPILE_BACKEND = L.COMPILE_BACKEND, "eager"
    try:
        losses, w = _train(hopper_tiny, {"compile_train": True}, steps=2)
    finally:
        L.COMPILE_BACKEND = backend
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    assert float((w - ref_w).abs().max()) < 1e-6


def test_gpu_levers_dry_run_on_cpu_as_the_gpu_check_calls_it(tmp_path):
    """scripts/gpu_levers.py `run("cpu", quick=True, ...)`: every part, every variant, one
    flat JSON-able row each, all checks passing, ~25 s."""
    spec = importlib.util.spec_from_file_location("gpu_levers", ROOT / "scripts" / "gpu_levers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = []
    assert mod.run("cpu", True, rows.append, tmp_path / "work") is True
    json.dumps(rows)  # JSON-able
    assert all(r["item"] == "lever" and r["device"] == "cpu" and r["ok"] for r in rows)
    assert all(isinstance(v, (str, int, float, bool, type(None)))
               for r in rows for v in r.values())  # flat
    for part, variants in mod.VARIANTS.items():
        assert [r["variant"] for r in rows if r["part"] == part] == list(variants)
    errors = {r["variant"]: r for r in rows if r["part"] == "rollout-error"}
    assert errors["tf32"]["drift_vs_fp32"] == 0.0  # TF32 is no arithmetic on a CPU
    assert 0 < errors["bf16"]["drift_vs_fp32"] < errors["fp32-reseed"]["drift_vs_fp32"]
    assert L.COMPILE_BACKEND == "inductor"  # the dry run's eager backend does not leak


def test_a_diffusion_job_runs_with_its_specs_levers_and_records_them(hopper_random, tmp_path,
                                                                    monkeypatch):
    """harness.runner.run_job on a real train-model job (tiny.yaml's diffusion model, 4 steps):
    the spec's levers are the job's while it trains, recorded in its model, and the CPU
    numbers of a TF32 lever are the default's (TF32 is GPU arithmetic)."""
    from harness import runner
    from harness.checkpoint import load_checkpoint
    from harness.data.d4rl import write_hdf5
    monkeypatch.setenv("DYDIFF_MLFLOW", "0")
    data = write_hdf5(hopper_random, tmp_path / "hopper-random.hdf5")
    weights = {}
    monkeypatch.setattr(L, "_job", L.DEFAULT)  # run_job sets the process's levers: undone after
    for name, chosen in (("default", {}), ("tf32", {"diffusion_train": "tf32"})):
        cfg = plan.load_config(ROOT / "tests" / "configs" / "tiny.yaml", {
            "results_dir": str(tmp_path / name), "levers": chosen,
            "models": {"diffusion": {"train_steps": 4, "checkpoint_every": 4}}})
        spec = plan.with_context(cfg, plan.model_job(cfg, "diffusion", "hopper-medium-replay", 0))
        assert spec.get("levers", {}) == chosen
        runner.run_job({**spec, "dataset": str(data)})
        model = load_checkpoint(Path(spec["out"]) / "model.pt")
        assert model["summary"]["levers"] == {"diffusion_train": chosen.get(
            "diffusion_train", "fp32"), "compile_train": False}
        weights[name] = model["ema"]
    assert all(torch.equal(weights["default"][k], weights["tf32"][k]) for k in weights["default"])
