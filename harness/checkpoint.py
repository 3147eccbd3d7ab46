"""Atomic files and checkpoints: a crash or kill -9 never leaves a half-written file, and a
resumed step continues its random streams exactly.

`Checkpointer` is the resume bookkeeping all five trainers share (dataset generation, ensemble,
reward model, diffusion, offline loop); each keeps its own loop and its own state.
"""
from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from harness.config import ConfigError

log = logging.getLogger(__name__)

CHECKPOINT, METRICS = "checkpoint.pt", "metrics.parquet"


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
    a mismatch is an error (a ConfigError, which the CLI reports as such) rather than a silent
    resume of a different job."""
    path = Path(path)
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    changed = [k for k, v in (expect or {}).items() if state.get(k) != v]
    if changed:
        raise ConfigError(f"{path} was written with a different {what + ' ' if what else ''}"
                          f"{' / '.join(changed)}; remove it or use another out_dir")
    return state


def rng_state() -> dict[str, Any]:
    """Everything needed to resume random streams exactly (for checkpoints). CUDA's streams
    only once CUDA is in use: a CPU job on a GPU machine never starts it."""
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """One trainer's checkpoint: load or start afresh, log metrics rows, save every so often.

    On load it restores the global RNG streams, the metrics rows so far, the wall time and the
    count to resume from (`start`), so the trainer only restores its own state (weights,
    optimiser, its own generators) from `state`. Counts (`at`, `start`, `every`, `stop_at`)
    are in the trainer's own unit: gradient step, epoch or env step.
    """

    def __init__(self, path: str | os.PathLike, expect: dict[str, Any], every: int,
                 what: str = "", columns: Sequence[str] | None = None, unit: str = "step"):
        """path: the checkpoint file. expect: what a checkpoint must hold unchanged to be
        resumed (config, seed, ...), see `load_checkpoint`; `what` names the job in its error.
        every: counts between saves. columns: the metrics table's leading columns; it is
        written beside the checkpoint as metrics.parquet (None: no table). unit: what a count
        is, for the log."""
        self.path, self.expect, self.every, self.columns = Path(path), expect, every, columns
        self.state = load_checkpoint(self.path, expect, what)  # None: a fresh start
        self.rows: list[dict] = [] if self.state is None else self.state["metrics"]
        self.start = 0 if self.state is None else self.state["at"]  # where training resumes
        self.saved_at = self.start
        # Wall time keeps counting from where the checkpoint left it.
        self._t0 = time.perf_counter() - (0.0 if self.state is None
                                          else self.state["wall_time_s"])
        if self.state is not None:
            set_rng_state(self.state["rng"])
            log.info("resuming %s from %s %d", self.path, unit, self.start)

    @property
    def resumed(self) -> bool:
        return self.state is not None

    def wall_time_s(self) -> float:
        """Training time so far, summed across restarts."""
        return time.perf_counter() - self._t0

    def log(self, row: dict) -> dict:
        """Append a metrics row stamped with wall_time_s; returns it."""
        row = {**row, "wall_time_s": self.wall_time_s()}
        self.rows.append(row)
        return row

    def table(self) -> pd.DataFrame:
        """The rows: the leading columns, the others sorted, wall_time_s last (NaN if absent)."""
        first = [*(self.columns or ()), "wall_time_s"]
        df = pd.DataFrame(self.rows)
        for col in first:
            if col not in df:
                df[col] = np.nan
        return df[first[:-1] + sorted(set(df.columns) - set(first)) + ["wall_time_s"]]

    def save(self, at: int, **state: Any) -> None:
        """Write the metrics table, then the checkpoint (so a checkpoint always has its table
        beside it): the trainer's `state` plus expect, RNG streams, rows and wall time."""
        if self.columns is not None:
            with atomic_path(self.path.with_name(METRICS)) as tmp:
                self.table().to_parquet(tmp, index=False)
        save_checkpoint(self.path, {**state, **self.expect, "rng": rng_state(),
                                    "metrics": self.rows, "at": at,
                                    "wall_time_s": self.wall_time_s()})
        self.saved_at = at

    def maybe_save(self, at: int, done: bool, state: Callable[[], dict],
                   stop_at: int | None = None) -> bool:
        """Save `state()` once `every` counts have passed since the last save, at the end
        (`done`), or at the first count >= `stop_at` after the last save. Returns True when the
        trainer should return now: stop_at reached before the end (a simulated pre-emption, for
        tests; a run resumed past stop_at goes on).
        """
        stop = stop_at is not None and self.saved_at < stop_at <= at and not done
        if done or stop or at - self.saved_at >= self.every:
            self.save(at, **state())
        return stop
