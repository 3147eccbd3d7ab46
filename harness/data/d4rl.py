"""D4RL's hdf5 format, read and written directly (the `d4rl` package needs mujoco_py).

Layout: top-level datasets observations, actions, rewards, terminals, timeouts,
next_observations (float32 / bool), optionally infos/qpos and infos/qvel; metadata as attrs
(`sim_model`: the simulator model the data replays in, see harness/data/consistency.py;
`recorded_mujoco`, or a recorder's `mujoco_version`: the MuJoCo release it was recorded in).
D4RL's maze2d files have no next_observations: they are derived as d4rl.qlearning_dataset
does (`derive_next_observations`). D4RL's -v0 files have no `timeouts` (nor next_observations):
episode ends are derived as d4rl.qlearning_dataset derives them (`v0_timeouts`), recorded in
the dataset's `extra["timeouts"]`.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import h5py
import numpy as np

from harness.data.dataset import REQUIRED_KEYS, Dataset, DatasetError, validate_arrays
from harness.checkpoint import atomic_path
from harness.provenance import environment

log = logging.getLogger(__name__)


def d4rl_dataset_dir() -> Path:
    """`$D4RL_DATASET_DIR` if set, else `~/.d4rl/datasets` (where d4rl itself caches files)."""
    env = os.environ.get("D4RL_DATASET_DIR")
    return Path(env).expanduser() if env else Path.home() / ".d4rl" / "datasets"


def d4rl_path(name: str) -> Path:
    """Where D4RL keeps `name`: <dir>/<name>.hdf5 (d4rl names its downloads after the task)."""
    return d4rl_dataset_dir() / f"{name}.hdf5"


def read_hdf5(path: str | os.PathLike, name: str | None = None) -> Dataset:
    """Read a D4RL-layout hdf5 file, rejecting it with a list of problems if malformed."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"no dataset file at {path}")
    arrays: dict[str, np.ndarray | None] = {}
    try:
        with h5py.File(path, "r") as f:
            for key in REQUIRED_KEYS:
                arrays[key] = f[key][()] if key in f else None
            for key in ("qpos", "qvel"):
                arrays[key] = f[f"infos/{key}"][()] if f"infos/{key}" in f else None
            stored_name = f.attrs.get("name")
            sim_model = _text(f.attrs.get("sim_model"))
            recorded = _recording_release(f.attrs)
    except OSError as err:
        raise DatasetError(f"{path} is not a readable hdf5 file: {err}") from None
    name = name or _text(stored_name) or path.stem
    extra = {}
    if arrays["timeouts"] is None and not any(arrays[k] is None
                                              for k in ("observations", "terminals")):
        arrays["timeouts"] = v0_timeouts(arrays["terminals"], _max_episode_steps(path, name))
        extra["timeouts"] = V0_TIMEOUTS
        log.info("%s: no 'timeouts' key (D4RL's -v0 layout): %s", path, V0_TIMEOUTS)
    derived = arrays["next_observations"] is None and not any(
        arrays[k] is None for k in ("observations", "timeouts"))
    if derived:
        arrays = derive_next_observations(arrays)
    problems = validate_arrays(arrays)
    if problems:
        raise DatasetError(f"{path} is not a valid D4RL dataset: " + "; ".join(problems))
    if sim_model:
        extra["sim_model"] = sim_model
    if recorded:
        extra["recorded_mujoco"] = recorded
    if derived:
        extra["next_observations"] = "derived: observations[t + 1], timeout rows dropped"
    return Dataset(name=str(name), source=str(path), extra=extra, **arrays)


V0_TIMEOUTS = ("derived as d4rl.qlearning_dataset does for a file without them (-v0): a "
               "step counter, reset after a terminal and at the task's max_episode_steps - 1, "
               "flags a time-limit end")


def _max_episode_steps(path: Path, name: str) -> int:
    from harness.envs import task_spec
    try:
        return task_spec(name).max_episode_steps
    except KeyError as err:
        raise DatasetError(f"{path}: no 'timeouts' key (D4RL's -v0 layout) and its task is "
                           f"unknown, so its episode ends cannot be derived: {err.args[0]}; "
                           f"name the file after its task (e.g. hopper-medium-v0.hdf5)") from None


def v0_timeouts(terminals: np.ndarray, max_episode_steps: int) -> np.ndarray:
    """Time-limit ends of a file without a `timeouts` key (D4RL's -v0 files), found exactly as
    d4rl.qlearning_dataset finds them (d4rl/__init__.py, `use_timeouts = False`): a step
    counter runs over rows 0 .. N-2; the row at which it reads max_episode_steps - 1 is a
    time-limit end (its successor row is the next episode's first) and the counter restarts
    at 0 there; a terminal restarts it too, but D4RL increments it on that same row, so the
    episode after a terminal starts at 1 (that quirk kept, as the published -v0 numbers were
    read with it). The last row has no successor and is dropped by derive_next_observations."""
    terminals = np.asarray(terminals).astype(bool).reshape(-1)
    out = np.zeros(len(terminals), dtype=bool)
    step = 0
    for i in range(len(terminals) - 1):
        if step == max_episode_steps - 1:
            out[i], step = True, 0
            continue
        if terminals[i]:
            step = 0
        step += 1
    return out


def derive_next_observations(arrays: dict) -> dict:
    """next_observations for a file without them (D4RL's maze2d), as d4rl.qlearning_dataset
    builds its transitions: next = observations[t + 1]; a row flagged as timeout, and the last
    row, has no recorded successor and is dropped. The row before a dropped one becomes the
    end of its episode (timeout), so no sequence model reads across the cut."""
    n = len(arrays["observations"])
    timeouts = np.asarray(arrays["timeouts"], dtype=bool)
    keep = ~timeouts
    keep[-1] = False
    out = {k: None if v is None else np.asarray(v)[keep] for k, v in arrays.items()
           if k != "next_observations"}
    out["next_observations"] = np.asarray(arrays["observations"])[1:][keep[:-1]]
    before_cut = np.zeros(n, dtype=bool)
    before_cut[:-1] = ~keep[1:]   # the next row is dropped (or is the end of the data)
    out["timeouts"] = (before_cut & keep)[keep]
    if out.get("terminals") is not None:
        out["timeouts"] &= ~out["terminals"].astype(bool)
    return out


def _text(value) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


# attrs naming the MuJoCo release a file was recorded in: the harness's own (written by the
# import step and dataset generation), then the recorder's (scripts/record_release.py).
RECORDING_ATTRS = ("recorded_mujoco", "mujoco_version")


def _recording_release(attrs) -> str | None:
    for key in RECORDING_ATTRS:
        value = _text(attrs.get(key))
        if value:
            return str(value)
    return None


def stored_recording_release(path: str | os.PathLike) -> str | None:
    """The MuJoCo release a dataset file was recorded in (attr `recorded_mujoco`, else
    `mujoco_version`); None if the file does not say."""
    with h5py.File(path, "r") as f:
        return _recording_release(f.attrs)


def stored_sim_model(path: str | os.PathLike) -> str | None:
    """The simulator model recorded with a dataset file (attr `sim_model`, written by the
    import step's consistency check and by dataset generation); None if it has none."""
    with h5py.File(path, "r") as f:
        return _text(f.attrs.get("sim_model"))


def write_hdf5(dataset: Dataset, path: str | os.PathLike, **attrs) -> Path:
    """Write `dataset` in D4RL's layout, atomically (temp file + rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for key in REQUIRED_KEYS:
                f.create_dataset(key, data=getattr(dataset, key), compression="gzip",
                                 compression_opts=1)
            if dataset.has_states:
                f.create_dataset("infos/qpos", data=dataset.qpos)
                f.create_dataset("infos/qvel", data=dataset.qvel)
            f.attrs["name"] = dataset.name
            # The software that wrote the file (for generated data: that recorded it).
            f.attrs["environment"] = json.dumps(environment())
            for key in ("sim_model", "recorded_mujoco"):  # read from a file: keep them
                if dataset.extra.get(key):
                    f.attrs[key] = dataset.extra[key]
            for key, value in attrs.items():
                f.attrs[key] = value
    return path
