"""Atomic files and checkpoints: a crash or kill -9 never leaves a half-written file, and a
resumed step continues its random streams exactly."""
from __future__ import annotations

import os
import random
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch


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
