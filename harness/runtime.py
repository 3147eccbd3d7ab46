"""What every job does first and records: seeding, the device, the code version.

The device is the job's (`use_device`, called once by harness.runner from the job spec's
`device`, which harness.plan decides per rule: README, Cluster / Devices); every trainer then
takes `device()`. Outside a job (tests, notebooks) it is the CPU.
"""
from __future__ import annotations

import fcntl
import os
import random
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from harness.config import ConfigError

DEVICE_NAME = re.compile(r"^(cpu|cuda(:\d+)?)$")
# cuBLAS needs a fixed workspace to be deterministic (CUDA docs, "Results reproducibility");
# it must be set before the first cuBLAS call.
CUBLAS_WORKSPACE = ":4096:8"

_job_device = torch.device("cpu")
_gpu_lock = None  # the open lock file of the GPU this process claimed (held until exit)


class DeviceError(ConfigError):
    """A job was given a device this machine's torch cannot use."""


def seed_everything(seed: int) -> np.random.Generator:
    """Seed python, numpy and torch; return a numpy Generator for the caller's own draws."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def check_device_name(name: str, where: str = "device") -> str:
    """`name` if it is cpu, cuda or cuda:N, else one line naming `where`."""
    if not isinstance(name, str) or not DEVICE_NAME.match(name):
        raise DeviceError(f"{where}: {name!r} is not a device; use cpu, cuda or cuda:N")
    return name


def set_deterministic(on: bool) -> None:
    """Deterministic kernels (or torch's defaults): `torch.use_deterministic_algorithms`, cuDNN's
    deterministic algorithms without autotuning, and cuBLAS's fixed workspace. CPU kernels are
    deterministic either way; on a GPU `on` costs speed (docs/performance.md)."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on


def _claim_gpu() -> str:
    """`cuda:<i>` of a GPU no other job of this user holds (an advisory lock file per GPU), for
    several GPU jobs on one workstation (`--resources gpu=N`). Under a scheduler that sets
    CUDA_VISIBLE_DEVICES (SLURM), or with one GPU, that is simply cuda:0."""
    global _gpu_lock
    count = torch.cuda.device_count()
    if count <= 1 or os.environ.get("SLURM_JOB_ID"):
        return "cuda:0"
    for i in range(count):
        lock = open(Path(tempfile.gettempdir()) / f"dydiff-bench-{os.getuid()}-gpu{i}.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        _gpu_lock = lock
        return f"cuda:{i}"
    return "cuda:0"  # more GPU jobs than GPUs: the scheduler's gpu resource should prevent it


def use_device(name: str, deterministic: bool = True, where: str = "device") -> torch.device:
    """Make `name` (cpu, cuda, cuda:N) this process's job device, or stop with one line: a job
    given a GPU on a machine whose torch sees none would otherwise hold the GPU and run on CPU."""
    check_device_name(name, where)
    global _job_device
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            build = (f"a CPU build of torch {torch.__version__}" if torch.version.cuda is None
                     else f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable "
                          f"GPU (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
            raise DeviceError(f"{where}: this job was given {name!r} but {build}; install the "
                              f"CUDA build with `make install-gpu`, or run it on the CPU with "
                              f"--device cpu")
        if name == "cuda":
            name = _claim_gpu()
        index = int(name.split(":")[1])
        if index >= torch.cuda.device_count():
            raise DeviceError(f"{where}: {name!r} but torch sees {torch.cuda.device_count()} "
                              f"GPU(s)")
        torch.cuda.set_device(index)
    set_deterministic(deterministic)
    _job_device = torch.device(name)
    return _job_device


def device() -> torch.device:
    """This job's device (`use_device`); the CPU outside a job."""
    return _job_device


def device_record(dev: torch.device | str | None = None) -> dict:
    """What final.json / eval.json / MLflow record of the device: type, name (the GPU's),
    torch and its CUDA and cuDNN versions, and whether deterministic kernels were on."""
    dev = torch.device(dev if dev is not None else _job_device)
    gpu = dev.type == "cuda"
    return {"type": dev.type, "index": dev.index if gpu else None,
            "name": torch.cuda.get_device_name(dev) if gpu else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if gpu else None,
            "deterministic": torch.are_deterministic_algorithms_enabled()}


def start_training(out_dir: str | os.PathLike, seed: int, on: torch.device | str | None = None
                   ) -> tuple[Path, torch.device, np.random.Generator]:
    """What every model-training step does first: create out_dir, pick the device (`on`, else
    `device()`), seed everything. Returns (out_dir, device, numpy Generator)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir, device() if on is None else torch.device(on), seed_everything(seed)


def git_sha(default: str = "unknown") -> str:
    """The repository's HEAD sha (with '-dirty' if there are local changes)."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout
        return sha + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return default


def device_of(module) -> torch.device:
    """The device a module's parameters live on (CPU for a parameter-free one)."""
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")
