"""The device policy: per-rule devices from the plan, one-line refusals, determinism flags,
checkpoints that refuse to change device, and device records in results."""
from __future__ import annotations

import os

import pytest
import torch

from harness import plan, runtime
from harness.checkpoint import Checkpointer, CheckpointError
from harness.config import ConfigError

PAPER = "config/paper.yaml"
SMOKE = "config/smoke.yaml"


@pytest.fixture(autouse=True)
def back_to_cpu():
    yield
    runtime.use_device("cpu", deterministic=True)


def test_paper_devices_per_rule():
    cfg = plan.load_config(PAPER)
    assert plan.job_device(cfg, "diffusion") == "cuda" and plan.gpus(cfg, "diffusion") == 1
    assert plan.job_device(cfg, "rollout_error") == "cuda"
    for model in ("ensemble", "reward"):
        assert plan.job_device(cfg, model) == "cpu" and plan.gpus(cfg, model) == 0
    for method in cfg["methods"]:
        gpu = method.startswith("dydiff") or method == "cql-corl"  # paper.yaml says why
        assert plan.job_device(cfg, "policy", method) == ("cuda" if gpu else "cpu"), method
        assert plan.gpus(cfg, "policy", method) == int(gpu), method
    spec = plan.policy_job(cfg, "td3bc", cfg["tasks"][0], 0)
    assert spec["device"] == "cpu" and spec["deterministic"] is True
    assert plan.eval_job(cfg, "dydiff-td3bc", cfg["tasks"][0], 0)["device"] == "cpu"


def test_smoke_runs_on_cpu_only():
    cfg = plan.load_config(SMOKE)
    assert {s.get("device", "cpu") for s in plan.all_jobs(cfg)} == {"cpu"}


def test_config_key_overrides_and_asks_for_a_gpu():
    cfg = plan.load_config(SMOKE, {"devices": {"policy": "cuda:1",
                                               "per_method": {"td3bc": "cpu"}}})
    assert plan.job_device(cfg, "policy", "cql") == "cuda:1"
    assert plan.gpus(cfg, "policy", "cql") == 1  # a CUDA job never goes without a GPU
    assert plan.job_device(cfg, "policy", "td3bc") == "cpu"
    assert plan.policy_job(cfg, "td3bc", cfg["tasks"][0], 0)["config"] == \
        plan.policy_job(plan.load_config(SMOKE), "td3bc", cfg["tasks"][0], 0)["config"]


@pytest.mark.parametrize("devices, line", [
    ({"policy": "gpu"}, "devices.policy: 'gpu' is not a device; use cpu, cuda or cuda:N"),
    ({"per_method": {"cql-corl": "cuda"}}, "devices.per_method.cql-corl: not one of methods"),
    ({"diffusion": "cuda:x"}, "devices.diffusion: 'cuda:x' is not a device"),
])
def test_bad_device_names_are_one_line(devices, line):
    with pytest.raises(ConfigError) as err:
        plan.load_config(SMOKE, {"devices": devices})
    assert line in str(err.value) and "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_job_without_cuda_stops_with_one_line():
    with pytest.raises(runtime.DeviceError) as err:
        runtime.use_device("cuda", where="train-policy device")
    msg = str(err.value)
    assert "\n" not in msg and "given 'cuda'" in msg and "make install-gpu" in msg
    assert torch.__version__ in msg and runtime.device().type == "cpu"


def test_cli_device_flag(tmp_path, capsys):
    from harness.cli import main
    rc = main(["train-policy", "--configfile", SMOKE, "--task", "hopper-medium-replay",
               "--method", "td3bc", "--device", "gpu"])
    assert rc == 2
    assert capsys.readouterr().err.strip() == \
        "dydiff-bench train-policy: error: --device: 'gpu' is not a device; use cpu, cuda or cuda:N"


def test_deterministic_flags(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    runtime.use_device("cpu", deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == runtime.CUBLAS_WORKSPACE
    assert runtime.device_record()["deterministic"] is True
    runtime.use_device("cpu", deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark


def test_checkpoint_refuses_another_device(tmp_path):
    path = tmp_path / "checkpoint.pt"
    Checkpointer(path, {"seed": 0}, every=1, device="cuda").save(3, weights=torch.zeros(2))
    with pytest.raises(CheckpointError) as err:
        Checkpointer(path, {"seed": 0}, every=1, device="cpu")
    msg = str(err.value)
    assert "\n" not in msg and "written by a job on cuda, this one runs on cpu" in msg
    assert Checkpointer(path, {"seed": 0}, every=1, device="cuda").start == 3
    assert Checkpointer(path, {"seed": 0}, every=1, device="cpu", portable=True).start == 3


# ---- device-agnostic code, checked on CPU ----------------------------------------------------
# A tensor created without `device=` sits on the CPU on a GPU job (a crash or a silent copy);
# explicit_devices fails on it here (tests/explicit_devices.py says why not the meta device).

def test_offline_loop_mopo_rollouts_and_evaluation_name_their_devices(hopper_random, tmp_path):
    from explicit_devices import explicit_devices
    from test_mopo import ENSEMBLE, TINY, loop_cfg
    from agents.sac import SAC, SACConfig
    from baselines import mopo
    from baselines.ensemble import train_ensemble
    from harness.training.evaluation import evaluate
    from harness.training.offline_loop import offline_loop
    with explicit_devices():
        train_ensemble(hopper_random, {**ENSEMBLE, "max_epochs": 1}, tmp_path / "ens", seed=0,
                       progress=False, device="cpu")
        gen = mopo.make_generator(hopper_random, {"rollout_length": 3, "rollout_batch_size": 40},
                                  {"ensemble": tmp_path / "ens"}, "cpu", 0)
        agent = SAC(hopper_random.obs_dim, hopper_random.act_dim, SACConfig(hidden=TINY))
        offline_loop(agent, hopper_random, loop_cfg(), tmp_path / "loop", seed=0,
                     generator=gen, progress=False)
        evaluate(agent, hopper_random.name, episodes=2, seed=0)


def test_rollout_error_study_names_its_devices(tmp_path):
    from explicit_devices import explicit_devices
    from test_rollout_error import _hopper_dataset
    import analysis.rollout_error as re
    from agents.td3bc import TD3BC, TD3BCConfig
    data = _hopper_dataset()
    agent = TD3BC(data.obs_dim, data.act_dim, TD3BCConfig(hidden=[16, 16]))
    with explicit_devices():
        re.rollout_error_study(data, {"simulator": re.SimulatorModel(data.name, data)},
                               agent=agent, horizon=4, n_starts=3, reps=10, progress=False)


def test_the_check_catches_a_factory_without_device():
    from explicit_devices import explicit_devices
    import harness.training.buffers as buffers  # any project module: the check is by file
    code = compile("torch.zeros(3)", buffers.__file__, "eval")
    with pytest.raises(AssertionError, match="zeros without device= at training/buffers.py"):
        with explicit_devices():
            eval(code, {"torch": torch})


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU (scripts/gpu_check.sh runs the GPU checks)")
def test_same_seed_same_numbers_on_one_gpu_with_deterministic_kernels():
    from agents.td3bc import TD3BC, TD3BCConfig
    runtime.use_device("cuda", deterministic=True)

    def losses():
        torch.manual_seed(0)
        agent = TD3BC(11, 3, TD3BCConfig(hidden=[64, 64])).to("cuda")
        batch = {"obs": torch.randn(256, 11, device="cuda"),
                 "actions": torch.rand(256, 3, device="cuda") * 2 - 1,
                 "rewards": torch.randn(256, device="cuda"),
                 "next_obs": torch.randn(256, 11, device="cuda"),
                 "terminals": torch.zeros(256, device="cuda")}
        return [agent.update(batch) for _ in range(20)]
    assert losses() == losses()


# ---- clusters: the driver, the GPUs a job was given, deterministic settings ------------------

@pytest.mark.parametrize("cuda, driver, ok", [("13.0", "580.159.04", True),
                                              ("13.0", "575.57.08", False),
                                              ("12.8", "525.60.13", True),
                                              ("12.8", "470.256.02", False),
                                              (None, "470.256.02", True), ("13.0", None, True)])
def test_driver_too_old_for_the_torch_build(cuda, driver, ok):
    line = runtime.driver_too_old(cuda, driver, "2.13.0+cu130")
    assert (line is None) == ok
    if not ok:
        assert "\n" not in line and driver in line and f"CUDA {cuda}" in line


def test_gpu_job_on_a_too_old_driver_stops_with_one_line_saying_what_to_install(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(runtime, "driver_version", lambda: "535.104.05")
    with pytest.raises(runtime.DeviceError) as err:
        runtime.use_device("cuda", where="train-policy device")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("train-policy device: this job was given 'cuda'")
    assert "driver >= 580" in msg and "535.104.05" in msg
    assert "built for CUDA 12.x" in msg and "download.pytorch.org/whl/cu126" in msg


@pytest.mark.parametrize("env, allowed", [
    ({}, [0, 1, 2, 3]),
    ({"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": "2,3"}, [0, 1, 2, 3]),  # torch sees 4
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "1,3"}, [1, 3]),
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "0-3", "SLURM_STEP_GPUS": "2"}, [2]),
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "2-3,9"}, [2, 3]),
])
def test_allowed_gpus_honour_what_slurm_gave(env, allowed):
    assert runtime.allowed_gpus(4, env) == allowed


def test_local_profile_inside_an_allocation_spreads_gpu_jobs(monkeypatch, tmp_path):
    """Inside `salloc --gpus 4`, the local profile's GPU jobs each take a GPU of their own
    (the former rule gave every job cuda:0 whenever SLURM_JOB_ID was set)."""
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(runtime.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(runtime, "_gpu_lock", None)
    held = [runtime.claim_gpu([0, 1, 2, 3])[1] for _ in range(2)]  # two jobs hold GPUs 0, 1
    assert runtime._claim_gpu() == "cuda:2"
    for lock in held:
        lock.close()
    assert runtime._claim_gpu() == "cuda:0"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # the slurm profile's jobs
    assert runtime._claim_gpu() == "cuda:0"


def test_deterministic_mode_without_the_nan_fill():
    runtime.use_device("cpu", deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.utils.deterministic.fill_uninitialized_memory is False
    assert not torch.backends.cudnn.benchmark  # autotuning would change the algorithm per run
    runtime.use_device("cpu", deterministic=False)
    assert torch.backends.cudnn.benchmark
