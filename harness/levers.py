"""The GPU speed levers: how the networks' arithmetic runs, as named, recorded settings.

One experiment-config section, `levers` (validated by `Levers`), read like `deterministic`: a
job's spec carries the levers its work uses (`job_levers`), the runner makes them the job's
(`use_levers`) and records them; the code reads them where the work is done (`levers()`):

  diffusion_train   the U-Net's training step (dydiff/diffusion.py train_step)
  diffusion_sample  the sampler's network call (dydiff/sampler.py edm_sample); the sampler's
                    float64 updates around it are not touched
  agents            the agents' updates (harness/training/offline_loop.py)
  compile_train / compile_sample   `torch.compile` of the U-Net for either

Precisions (`PRECISIONS`): fp32 (strict IEEE float32: no TF32 anywhere), tf32_conv (PyTorch's
defaults: cuDNN convolutions in TF32, matmuls in float32), tf32 (both in TF32), bf16 (autocast
to bfloat16 around the network's forward; the loss, the optimiser and the weights stay
float32). TF32 only exists on NVIDIA GPUs (Ampere and later): on a CPU fp32, tf32_conv and
tf32 are the same arithmetic, bit for bit; bf16 autocast runs on CPUs too.

Defaults are what the DyDiff authors' code effectively ran (FineArtz/DyDiff, torch 1.12.1):
its diffusion training is EDM's training loop, which turns TF32 off for cuDNN and cuBLAS
(training/training_loop.py:141-143; README command without --fp16): fp32. Its sampling runs
in the RL process (run_scripts/dydiff_*_script.py -> generate_rl.py), which sets no flag:
torch 1.12's defaults, TF32 convolutions and float32 matmuls: tf32_conv. Its agents are MLPs
under those defaults (no convolutions): fp32. Nothing is compiled. docs/performance.md, "GPU
speed levers", says why each exists, what CUDA graphs would buy, and how to choose.
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref
from dataclasses import dataclass
from typing import Literal

import torch

from harness.config import from_dict

Precision = Literal["fp32", "tf32_conv", "tf32", "bf16"]
# name -> (cuDNN convolutions in TF32, matmuls in TF32, autocast dtype or None)
PRECISIONS: dict[str, tuple[bool, bool, torch.dtype | None]] = {
    "fp32": (False, False, None),
    "tf32_conv": (True, False, None),
    "tf32": (True, True, None),
    "bf16": (True, False, torch.bfloat16),  # what autocast leaves in float32: torch's defaults
}


@dataclass(frozen=True)
class Levers:
    # EDM's training loop (training_loop.py:141-143): strict float32.
    diffusion_train: Precision = "fp32"
    # The authors' RL process, torch 1.12 defaults: TF32 convolutions, float32 matmuls.
    diffusion_sample: Precision = "tf32_conv"
    # MLP updates (no convolutions); bf16 is not offered: see docs/performance.md.
    agents: Literal["fp32", "tf32"] = "fp32"
    compile_train: bool = False
    compile_sample: bool = False


DEFAULT = Levers()
# The levers each kind of job uses (harness.plan.runtime passes the kind).
USED_BY = {"diffusion": ("diffusion_train", "compile_train"),
           "sample": ("diffusion_sample", "compile_sample"),
           "agents": ("agents",)}

_job = DEFAULT


def parse(data: Levers | dict | None, where: str = "levers") -> Levers:
    """A Levers from a mapping of its fields (unknown keys, bad values: ConfigError naming
    the key), or itself."""
    return data if isinstance(data, Levers) else from_dict(Levers, data or {}, where=where)


def job_levers(data: dict | None, uses: tuple[str, ...]) -> dict:
    """What a job spec carries: the levers in `uses` set away from their defaults (a change of
    one reruns only the jobs that use it; the defaults are implied, so a spec stays the same
    where every lever is at its default)."""
    chosen = parse(data)
    return {k: getattr(chosen, k) for k in uses if getattr(chosen, k) != getattr(DEFAULT, k)}


def use_levers(data: Levers | dict | None, where: str = "levers") -> Levers:
    """Make `data` (defaults for missing fields) this process's job levers."""
    global _job
    _job = parse(data, where)
    return _job


def levers() -> Levers:
    """This job's levers (`use_levers`); the defaults outside a job."""
    return _job


@contextlib.contextmanager
def using(data: Levers | dict):
    """The levers `data` within the block (scripts, tests), the previous ones after it."""
    global _job
    before = _job
    _job = parse(data)
    try:
        yield _job
    finally:
        _job = before


def record() -> dict:
    """The job's levers, every field (final.json, MLflow tags)."""
    return dataclasses.asdict(_job)


@contextlib.contextmanager
def tf32_flags(precision: str):
    """PyTorch's TF32 switches as `precision` says within the block, restored after. The
    legacy `allow_tf32` attributes on purpose: torch >= 2.9 refuses to read them once its newer
    `fp32_precision` ones were set (and inductor reads them), so the harness uses one API."""
    conv, matmul, _ = PRECISIONS[precision]
    cudnn, cublas = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.allow_tf32, cublas.allow_tf32
    cudnn.allow_tf32, cublas.allow_tf32 = conv, matmul
    try:
        yield
    finally:
        cudnn.allow_tf32, cublas.allow_tf32 = before


def autocast(precision: str, device: torch.device | str):
    """bf16: autocast to bfloat16 on `device`'s type (a network's forward only: the backward
    runs outside it, in the forward's dtypes); otherwise nothing."""
    dtype = PRECISIONS[precision][2]
    kind = torch.device(device).type
    if dtype is None or kind not in ("cpu", "cuda"):  # (the meta device of explicit-device tests)
        return contextlib.nullcontext()
    return torch.autocast(device_type=kind, dtype=dtype)


# torch.compile's backend: inductor (fused generated kernels); scripts/gpu_levers.py's CPU dry
# run sets "eager" (the graph traced, no code generated: inductor takes ~85 s per compile on
# one CPU core).
COMPILE_BACKEND = "inductor"
_compiled: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = \
    weakref.WeakKeyDictionary()


def compiled(module: torch.nn.Module) -> torch.nn.Module:
    """`torch.compile(module)` (inductor, default mode, static shapes), made once per module:
    the first calls compile (tens of seconds), the later ones run the fused kernels. The
    module's parameters are shared, its state_dict keys unchanged."""
    if module not in _compiled:
        _compiled[module] = torch.compile(module, dynamic=False, backend=COMPILE_BACKEND)
    return _compiled[module]
