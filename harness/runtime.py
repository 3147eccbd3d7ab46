"""What every job does first and records: seeding, the device, the code version."""
from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed: int) -> np.random.Generator:
    """Seed python, numpy and torch; return a numpy Generator for the caller's own draws."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def device() -> torch.device:
    """`DYDIFF_DEVICE` if set, else CUDA when available, else CPU."""
    name = os.environ.get("DYDIFF_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
