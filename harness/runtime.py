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
    deterministic algorithms, and cuBLAS's fixed workspace. CPU kernels are deterministic
    either way; on a GPU `on` costs speed (docs/performance.md).

    Two choices, with their reasons:
    - torch's NaN fill of every new uninitialised tensor under deterministic algorithms
      (`torch.utils.deterministic.fill_uninitialized_memory`) is off: it costs a memory pass
      per `empty` and only changes numbers for code that reads memory before writing it, which
      the harness never does (the GPU check's same-seed runs would show it).
    - cuDNN autotuning (`cudnn.benchmark`) is on exactly when deterministic kernels are off.
      It times the candidate algorithms at each new shape and keeps the fastest; which one wins
      can differ between runs, and each rounds differently, so with it the numbers would not
      repeat (PyTorch's reproducibility notes). Without determinism it pays: a job's shapes are
      fixed (the training batch, the sampler's batch), one tuning per shape over 1e5-1e6 calls.
    """
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(on)
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on


# The oldest NVIDIA driver (Linux) each CUDA major version runs on, minor version compatibility
# included (NVIDIA, CUDA Toolkit release notes, "Minimum Required Driver Version").
MIN_DRIVER = {13: (580, 0, 0), 12: (525, 60, 13), 11: (450, 80, 2)}


def driver_version() -> str | None:
    """The NVIDIA driver's version ('580.159.04'), or None on a machine without one."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        found = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+\.\d+(?:\.\d+)?)", text)
        if found:
            return found.group(1)
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20)
        lines = out.stdout.strip().splitlines()
        return lines[0].strip() if out.returncode == 0 and lines else None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def driver_too_old(cuda: str | None, driver: str | None,
                   torch_version: str = torch.__version__) -> str | None:
    """Why `driver` cannot run a torch built for CUDA `cuda`, and what to install instead (one
    line), or None: no CUDA build, no driver, or a driver new enough."""
    if not cuda or not driver:
        return None
    need = MIN_DRIVER.get(int(cuda.split(".")[0]))
    have = _version(driver)
    if need is None or have >= need:
        return None
    runs = max((m for m, v in MIN_DRIVER.items() if have >= v), default=None)
    base = torch_version.split("+")[0]
    instead = (f"install torch {base} built for CUDA {runs}.x (`pip install torch=={base} "
               f"--index-url https://download.pytorch.org/whl/cu{runs}6`, README: Install) or "
               if runs is not None else "")
    return (f"torch {torch_version} is built for CUDA {cuda}, which needs NVIDIA driver >= "
            f"{'.'.join(map(str, need))}, and this machine's driver is {driver}: {instead}"
            f"update the driver")


def _ids(text: str) -> list[int]:
    """'0,2-3' -> [0, 2, 3] (SLURM's GPU lists)."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            out += list(range(int(lo), int(hi or lo) + 1))
    return out


def allowed_gpus(count: int, env=None) -> list[int]:
    """The GPU indices (torch's numbering) this job may use. CUDA_VISIBLE_DEVICES already
    limits what torch sees (SLURM sets it to the GPUs it gave the job): all `count` of them.
    Without it, SLURM_STEP_GPUS / SLURM_JOB_GPUS name the GPUs the allocation was given (set
    also where cgroups do not hide the others): only those."""
    env = os.environ if env is None else env
    if env.get("CUDA_VISIBLE_DEVICES") is not None:
        return list(range(count))
    given = env.get("SLURM_STEP_GPUS") or env.get("SLURM_JOB_GPUS")
    if given:
        return [i for i in _ids(given) if i < count]
    return list(range(count))


def _gpu_lock_name(index: int) -> str:
    """A GPU's lock file: named by its UUID, the same physical GPU under any numbering, so jobs
    of two allocations that share a node (and /tmp) lock different files for different GPUs."""
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
    except (AttributeError, RuntimeError, AssertionError):
        uuid = f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'all')}-{index}".replace(",", "_")
    return f"dydiff-bench-{os.getuid()}-gpu-{uuid}.lock"


def claim_gpu(candidates: list[int], lock_dir: Path | None = None):
    """(index, open lock file) of the first of `candidates` no other job of this user holds
    (an advisory lock per GPU, held until the file is closed or the process exits), or
    (candidates[0], None) when every one is held."""
    lock_dir = Path(lock_dir or tempfile.gettempdir())
    for i in candidates:
        lock = open(lock_dir / _gpu_lock_name(i), "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        return i, lock
    return candidates[0], None  # more GPU jobs than GPUs: the gpu resource should prevent it


def _claim_gpu() -> str:
    """`cuda:<i>` of a GPU this job may use that no other job of this user holds: GPU jobs on
    a workstation, or the local profile inside a multi-GPU SLURM allocation (`--resources
    gpu=N`), each get their own. One allowed GPU (each slurm-profile job gets one): that one."""
    global _gpu_lock
    candidates = allowed_gpus(torch.cuda.device_count())
    if not candidates:
        given = os.environ.get("SLURM_STEP_GPUS") or os.environ.get("SLURM_JOB_GPUS")
        raise DeviceError(f"device: SLURM gave this job GPU(s) {given}, none of them among the "
                          f"{torch.cuda.device_count()} torch sees")
    if len(candidates) == 1:
        return f"cuda:{candidates[0]}"
    index, _gpu_lock = claim_gpu(candidates)
    return f"cuda:{index}"


def use_device(name: str, deterministic: bool = True, where: str = "device") -> torch.device:
    """Make `name` (cpu, cuda, cuda:N) this process's job device, or stop with one line: a job
    given a GPU on a machine whose torch sees none would otherwise hold the GPU and run on CPU."""
    check_device_name(name, where)
    global _job_device
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            old = driver_too_old(torch.version.cuda, driver_version())
            if old is not None:
                raise DeviceError(f"{where}: this job was given {name!r} but {old}")
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
