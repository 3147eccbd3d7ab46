"""Small shared helpers: seeding, atomic files, checkpoints, provenance."""
from __future__ import annotations

import os
import random
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

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


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it and rename it over `path`.

    A crash (or kill -9) leaves either the old file or none, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """torch.save `state` atomically (temp file, fsync, rename)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike, expect: dict[str, Any] | None = None,
                    what: str = "") -> dict[str, Any] | None:
    """Load a checkpoint written by `save_checkpoint`, or None if there is none.

    expect: entries the checkpoint must hold unchanged to be resumed (config, seed, ...);
    a mismatch is an error rather than a silent resume of a different job."""
    path = Path(path)
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    changed = [k for k, v in (expect or {}).items() if state.get(k) != v]
    if changed:
        raise ValueError(f"{path} was written with a different {what + ' ' if what else ''}"
                         f"{' / '.join(changed)}; remove it or use another out_dir")
    return state


def rng_state() -> dict[str, Any]:
    """Everything needed to resume random streams exactly (for checkpoints)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


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
