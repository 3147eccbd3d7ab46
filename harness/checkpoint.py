"""Atomic files and checkpoints: a crash or kill -9 never leaves a half-written file, a
resumed step continues its random streams exactly, and loading a checkpoint never runs code.

Every checkpoint is read with `torch.load(weights_only=True)`: results folders are shared on
clusters, and a pickled object in a file could otherwise run anything. So a checkpoint holds
only tensors and plain Python values (dict, list, tuple, str, int, float, bool, None);
`save_checkpoint` refuses anything else (numpy arrays and scalars, dataclasses, paths) by
name, at the first save rather than at a resume days later.

`Checkpointer` is the resume bookkeeping all five trainers share (dataset generation, ensemble,
reward model, diffusion, offline loop); each keeps its own loop and its own state. It keeps
the last two checkpoints, so a truncated or corrupt newest one falls back to the one before.
"""
from __future__ import annotations

import errno
import logging
import os
import pickle
import random
import tempfile
import time
import zipfile
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from harness.config import ConfigError

log = logging.getLogger(__name__)

CHECKPOINT, METRICS = "checkpoint.pt", "metrics.parquet"


class CheckpointError(ConfigError):
    """No readable checkpoint where one was written (truncated, corrupt, refused by
    weights_only). A ConfigError so the CLI reports it as one line, like a checkpoint of
    another job."""


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike,
                previous: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it and rename it over `path`.

    A crash (or kill -9) leaves either the old file or none, never a half-written one.
    previous: first rename the current `path` (if any) to this name, so the last two versions
    survive; a crash between the two renames leaves only `previous`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    # mkstemp creates 0600; give the file the mode a plain open() would (shared results).
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp_path, path)
    except OSError as err:
        if err.errno == errno.ENOSPC and err.filename is None:  # say which file did not fit
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def previous_path(path: str | os.PathLike) -> Path:
    """Where `save_checkpoint(keep_previous=True)` keeps the one before: x.pt -> x.prev.pt."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


_PLAIN = (str, int, float, bool, bytes, type(None))


def check_loadable(value: Any, where: str = "state") -> None:
    """Raise TypeError naming the first value under `where` that weights_only refuses.

    Exact types: np.float64 is a float subclass and defaultdict a dict subclass, yet both
    pickle as globals that weights_only refuses."""
    kind = type(value)
    if isinstance(value, torch.Tensor) or kind is torch.Size or kind in _PLAIN:
        return
    if kind in (dict, OrderedDict):
        for k, v in value.items():
            check_loadable(k, f"{where} key {k!r}")
            check_loadable(v, f"{where}[{k!r}]")
    elif kind in (list, tuple):
        for i, v in enumerate(value):
            check_loadable(v, f"{where}[{i}]")
    else:
        raise TypeError(f"checkpoint value {where} is a {kind.__module__}.{kind.__qualname__}, "
                        f"which torch.load(weights_only=True) refuses; store a tensor or plain "
                        f"Python values instead")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any],
                    keep_previous: bool = False) -> None:
    """torch.save `state` atomically (temp file, fsync, rename). keep_previous: the current
    file becomes `previous_path(path)` first (what `load_checkpoint(fallback=True)` reads
    when the newest is unreadable)."""
    check_loadable(state)
    with atomic_path(path, previous_path(path) if keep_previous else None) as tmp, \
            open(tmp, "wb") as f:
        writer = _KeepWriteError(f)
        try:
            torch.save(state, writer)
        except RuntimeError as err:
            if writer.error is None:
                raise
            raise writer.error from err


class _KeepWriteError:
    """The file torch.save writes through, keeping the OSError of a failed write: torch
    swallows it and reports a full disk only as "unexpected pos 704 vs 598"."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


class _Unreadable(Exception):
    """One file could not be read; the message says why (one line)."""


def _refusal(err: Exception) -> str:
    """The line of torch's long weights_only message that names what was refused."""
    for line in str(err).splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].split(". Please", 1)[0].strip()
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _read(path: Path) -> dict[str, Any]:
    """One checkpoint file, or _Unreadable. The zip's CRCs are checked first: torch.load
    itself reads a flipped byte in tensor data without complaint."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except Exception as err:  # truncated, empty, not a torch file, unreadable
        raise _Unreadable(f"not a complete torch file ({type(err).__name__}: {err})") from err
    if bad is not None:
        raise _Unreadable(f"corrupt (CRC mismatch in {bad.split('/', 1)[-1]})")  # data/0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _Unreadable(f"refused by torch.load(weights_only=True): {_refusal(err)}") from err
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise _Unreadable(f"{type(err).__name__}: {first}") from err
    if not isinstance(state, dict):
        raise _Unreadable(f"holds a {type(state).__name__}, not a checkpoint dict")
    return state


def load_checkpoint(path: str | os.PathLike, expect: dict[str, Any] | None = None,
                    what: str = "", fallback: bool = False) -> dict[str, Any] | None:
    """Load a checkpoint written by `save_checkpoint`, or None if there is none.

    Always with torch.load(weights_only=True). An unreadable file is a CheckpointError naming
    it and why. fallback: `path` was saved with keep_previous; if it is missing or unreadable,
    warn and load `previous_path(path)`; only if both are bad, a CheckpointError naming both.
    expect: entries the checkpoint must hold unchanged to be resumed (config, seed, ...);
    a mismatch is an error (a ConfigError, which the CLI reports as such) rather than a silent
    resume of a different job."""
    path = Path(path)
    candidates = [path, previous_path(path)] if fallback else [path]
    if not any(p.exists() for p in candidates):
        return None
    why = []
    for p in candidates:
        if not p.exists():
            why.append(f"{p} (missing)")
            if p != candidates[-1]:  # the previous one exists: a save cut between renames
                log.warning("checkpoint %s is missing (a save was interrupted); trying %s",
                            p, candidates[-1])
            continue
        try:
            state = _read(p)
        except _Unreadable as err:
            why.append(f"{p} ({err})")
            log.warning("checkpoint %s is unreadable: %s%s", p, err,
                        f"; trying {candidates[-1]}" if p != candidates[-1] else "")
            continue
        if p != path:
            log.warning("resuming from the previous checkpoint %s", p)
        changed = [k for k, v in (expect or {}).items() if state.get(k) != v]
        if changed:
            raise ConfigError(f"{p} was written with a different {what + ' ' if what else ''}"
                              f"{' / '.join(changed)}; remove it or use another out_dir")
        return state
    if fallback:
        raise CheckpointError(f"no readable checkpoint: {'; '.join(why)}; remove both files to "
                              f"start over")
    raise CheckpointError(f"cannot read {why[0]}; remove it and rerun the step that wrote it")


def check_same_device(saved: str, now: str, path) -> None:
    """Random streams do not move between devices: a CPU generator's state (Mersenne Twister)
    and a CUDA one's (Philox seed and offset) are different things, so a job resumed on another
    kind of device could not continue its sampling streams; it stops with one line instead."""
    if saved != now:
        raise CheckpointError(f"{path} was written by a job on {saved}, this one runs on {now}: "
                              f"its random streams cannot continue on another device; run it on "
                              f"{saved} again (--device {saved} / devices.<kind>) or remove the "
                              f"checkpoint to start over on {now}")


def rng_state() -> dict[str, Any]:
    """Everything needed to resume random streams exactly (for checkpoints), as tensors and
    plain values. CUDA's streams only once CUDA is in use: a CPU job on a GPU machine never
    starts it."""
    np_state = np.random.get_state(legacy=False)  # MT19937: key (624 uint32), pos, gauss
    return {"python": random.getstate(),  # (version, tuple of ints, gauss or None): plain
            "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                      "pos": int(np_state["state"]["pos"]),
                      "has_gauss": int(np_state["has_gauss"]),
                      "gauss": float(np_state["gauss"])},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    s = state["numpy"]
    np.random.set_state(("MT19937", s["key"].numpy().astype(np.uint32), s["pos"],
                         s["has_gauss"], s["gauss"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """One trainer's checkpoint: load or start afresh, log metrics rows, save every so often.

    On load it restores the global RNG streams, the metrics rows so far, the wall time and the
    count to resume from (`start`), so the trainer only restores its own state (weights,
    optimiser, its own generators) from `state`. Counts (`at`, `start`, `every`, `stop_at`)
    are in the trainer's own unit: gradient step, epoch or env step.

    The last two checkpoints are kept (`previous_path`); if the newest is unreadable it resumes
    from the one before, with a warning. metrics.parquet is a view of the rows the checkpoint
    holds, so it is rewritten from the loaded rows on resume: it then matches the checkpoint
    resumed from, even when that is the previous one or a kill came between the two writes.
    """

    def __init__(self, path: str | os.PathLike, expect: dict[str, Any], every: int,
                 what: str = "", columns: Sequence[str] | None = None, unit: str = "step",
                 device: str | torch.device | None = None, portable: bool = False):
        """path: the checkpoint file. expect: what a checkpoint must hold unchanged to be
        resumed (config, seed, ...), see `load_checkpoint`; `what` names the job in its error.
        every: counts between saves. columns: the metrics table's leading columns; it is
        written beside the checkpoint as metrics.parquet (None: no table). unit: what a count
        is, for the log. device: where the trainer runs (default: the job's,
        harness.runtime.device()); a checkpoint resumes on the same kind of device only, unless
        `portable` (the trainer draws from CPU generators alone, so its streams go on anywhere)."""
        from harness.runtime import device as job_device
        self.path, self.expect, self.every, self.columns = Path(path), expect, every, columns
        self.device = torch.device(device if device is not None else job_device()).type
        self.state = load_checkpoint(self.path, expect, what, fallback=True)  # None: fresh
        if self.state is not None and not portable:
            check_same_device(self.state.get("device", "cpu"), self.device, self.path)
        self.rows: list[dict] = [] if self.state is None else self.state["metrics"]
        self.start = 0 if self.state is None else self.state["at"]  # where training resumes
        self.saved_at = self.start
        # Wall time keeps counting from where the checkpoint left it.
        self._t0 = time.perf_counter() - (0.0 if self.state is None
                                          else self.state["wall_time_s"])
        if self.state is not None:
            set_rng_state(self.state["rng"])
            if self.columns is not None:
                self._write_table()
            log.info("resuming %s from %s %d", self.path, unit, self.start)

    @property
    def resumed(self) -> bool:
        return self.state is not None

    def wall_time_s(self) -> float:
        """Training time so far, summed across restarts."""
        return time.perf_counter() - self._t0

    def log(self, row: dict) -> dict:
        """Append a metrics row stamped with wall_time_s; returns it. numpy scalars become
        Python ones (the checkpoint holds the rows; weights_only refuses numpy types)."""
        row = {**{k: v.item() if isinstance(v, np.generic) else v for k, v in row.items()},
               "wall_time_s": self.wall_time_s()}
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

    def _write_table(self) -> None:
        with atomic_path(self.path.with_name(METRICS)) as tmp:
            self.table().to_parquet(tmp, index=False)

    def save(self, at: int, **state: Any) -> None:
        """Write the metrics table, then the checkpoint (so a checkpoint always has its table
        beside it): the trainer's `state` plus expect, RNG streams, rows and wall time. The
        checkpoint it replaces becomes the previous one."""
        if self.columns is not None:
            self._write_table()
        save_checkpoint(self.path, {**state, **self.expect, "rng": rng_state(),
                                    "device": self.device,
                                    "metrics": self.rows, "at": at,
                                    "wall_time_s": self.wall_time_s()}, keep_previous=True)
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
