"""One entry point for every dataset source: a D4RL-layout hdf5 path, a D4RL name, a Minari id.

Whatever the source, the result is a `Dataset` named in D4RL style without the version suffix
('hopper-medium'), so normalised scores and result tables line up across sources. Nothing is
ever downloaded: a missing dataset is an error that says where we looked and how to get data.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from harness.data.d4rl import d4rl_dataset_dir, d4rl_path, read_hdf5
from harness.data.dataset import Dataset, DatasetError
from harness.data.inputs import check_against_task
from harness.envs import family_of, task_spec

_VERSION = re.compile(r"-v\d+$")
HDF5_SUFFIXES = (".hdf5", ".h5")

HOW_TO_GET_DATA = (
    "To get data, either (1) put D4RL's hdf5 files (e.g. hopper-medium-v2.hdf5) under "
    "$D4RL_DATASET_DIR (or ~/.d4rl/datasets), (2) install a Minari dataset locally "
    "(`minari download mujoco/hopper/medium-v0`, stored under $MINARI_DATASETS_PATH or "
    "~/.minari/datasets), or (3) generate datasets locally with `dydiff-bench "
    "generate-datasets` (the Snakemake workflow runs it) and pass the .hdf5 file's path.")


# Minari environment names whose tasks the harness knows under D4RL's name.
MINARI_ENVS = {"pointmaze": "maze2d"}


def d4rl_style_name(spec: str) -> str:
    """'hopper-medium-replay-v2' / 'mujoco/hopper/medium-v0' / '.../hopper-medium-v2.hdf5'
    -> 'hopper-medium-replay' / 'hopper-medium' / 'hopper-medium';
    'D4RL/pointmaze/umaze-dense-v2' -> 'maze2d-umaze-dense'."""
    if is_minari_id(spec):
        _ns, env, dataset = spec.split("/")
        env = MINARI_ENVS.get(env.lower(), env.lower())
        return f"{env}-{_VERSION.sub('', dataset.lower())}"
    stem = Path(spec).name
    for suffix in HDF5_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return _VERSION.sub("", stem.lower())


def is_path(spec: str) -> bool:
    """A file path (anything ending in .hdf5/.h5, containing a path separator, or existing)."""
    return spec.endswith(HDF5_SUFFIXES) or "/" in spec or os.sep in spec or Path(spec).exists()


def is_minari_id(spec: str) -> bool:
    """Minari ids are 'namespace/env/dataset-vN' (e.g. 'mujoco/hopper/medium-v0')."""
    return (not spec.endswith(HDF5_SUFFIXES) and spec.count("/") == 2
            and _VERSION.search(spec) is not None and not Path(spec).exists())


def load_dataset(spec: str, *, minari_root: str | os.PathLike | None = None,
                 task: str | None = None) -> Dataset:
    """Load `spec`: a D4RL-layout .hdf5 path, a D4RL name ('hopper-medium-v2') looked up in
    the D4RL dataset dir, or a Minari id ('mujoco/hopper/medium-v0') read from the local Minari
    root (`minari_root`, else $MINARI_DATASETS_PATH, else ~/.minari/datasets). `task`: the
    task a file path is for, whatever its name (a user's file, `data.files`)."""
    spec = str(spec)
    if is_minari_id(spec):
        dataset = _load_minari(spec, minari_root)
    elif is_path(spec) and task:
        dataset = read_hdf5(locate_dataset(spec), name=task)
    elif is_path(spec):
        dataset = read_hdf5(locate_dataset(spec))
        # The name stored in the file's attrs wins; else the file name ('hopper-medium-v2.hdf5').
        if _family_or_none(dataset.name) is None:
            _check_family(d4rl_style_name(spec), spec)
            dataset.name = d4rl_style_name(spec)
        dataset.name = _VERSION.sub("", dataset.name)
    else:
        dataset = _load_d4rl_name(spec)
    check_against_task(dataset, spec)
    return dataset


def _family_or_none(name: str) -> str | None:
    try:
        return family_of(name)
    except KeyError:
        return None


def _check_family(name: str, spec: str) -> str:
    try:
        return family_of(name)
    except KeyError as err:
        raise DatasetError(f"dataset {spec!r}: {err.args[0]}") from None


def _load_d4rl_name(name: str) -> Dataset:
    return read_hdf5(locate_dataset(name), name=d4rl_style_name(name))


def locate_dataset(spec: str, *, minari_root: str | os.PathLike | None = None) -> Path:
    """Where `spec` (path, D4RL name or Minari id) would be read from, without reading it;
    a DatasetError saying where we looked if it is not there (the planner checks every
    dataset of a grid with this before the first job starts)."""
    spec = str(spec)
    if is_minari_id(spec):
        _check_family(d4rl_style_name(spec), spec)
        data_path = minari_dataset_dir(spec, minari_root) / "data"
        if not data_path.exists():
            raise DatasetError(f"Minari dataset {spec!r} is not installed locally: no "
                               f"{data_path}. {HOW_TO_GET_DATA}")
        return data_path
    if is_path(spec):
        path = Path(spec).expanduser()
        if not path.exists():
            raise DatasetError(f"no dataset file at {path}. {HOW_TO_GET_DATA}")
        return path
    _check_family(spec, spec)
    candidates = [d4rl_path(spec)]
    if not _VERSION.search(spec):  # 'hopper-medium' -> also try the usual D4RL versions
        candidates += [d4rl_path(f"{spec}-v{v}") for v in (2, 1, 0)]
    for path in candidates:
        if path.exists():
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise DatasetError(f"D4RL dataset {spec!r} not found; looked at: {looked} "
                       f"(D4RL dir: {d4rl_dataset_dir()}). {HOW_TO_GET_DATA}")


def minari_dataset_dir(dataset_id: str, minari_root: str | os.PathLike | None = None) -> Path:
    """<root>/<id>: `minari_root`, else $MINARI_DATASETS_PATH, else ~/.minari/datasets."""
    root = minari_root or os.environ.get("MINARI_DATASETS_PATH") \
        or Path.home() / ".minari" / "datasets"
    return Path(root).expanduser() / dataset_id


def _load_minari(dataset_id: str, minari_root: str | os.PathLike | None) -> Dataset:
    data_path = locate_dataset(dataset_id, minari_root=minari_root)
    from minari import MinariDataset  # imported lazily: it is slow to import

    try:
        minari_ds = MinariDataset(str(data_path))
    except Exception as err:  # minari raises assorted types for broken folders
        raise DatasetError(f"Minari dataset at {data_path} could not be read: {err}") from None
    name = d4rl_style_name(dataset_id)
    if family_of(name) == "maze2d":
        return pointmaze_to_dataset(minari_ds, name, source=f"minari:{dataset_id}")
    return minari_to_dataset(minari_ds, name=name, source=f"minari:{dataset_id}")


def pointmaze_to_dataset(minari_ds, name: str, source: str = "") -> Dataset:
    """Minari's `D4RL/pointmaze/*` episodes as D4RL's maze2d task sees them.

    Minari records PointMaze's dict observations in its centred frame, with rewards towards
    each episode's own random goal. Here: the 'observation' entry mapped to D4RL's coordinates
    (harness.maze2d.from_sim_pos / from_sim_vec), qpos/qvel = that position / velocity (the
    point mass's whole state), and rewards relabelled against the task's fixed evaluation goal
    from each row's observation, as D4RL's relabel_maze2d_rewards.py made its files."""
    from harness import maze2d
    maze, reward_type = maze2d.parse_task(name)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in (
        "observations", "next_observations", "actions", "terminals", "timeouts")}
    for ep in minari_ds.iterate_episodes():
        raw = ep.observations.get("observation") if isinstance(ep.observations, dict) else None
        if raw is None:
            raise DatasetError(f"{source}: expected PointMaze dict observations with an "
                               f"'observation' entry, episode {ep.id} has "
                               f"{type(ep.observations).__name__}")
        raw = np.asarray(raw, dtype=np.float64)
        obs = np.concatenate([maze2d.from_sim_pos(maze, raw[:, :2]),
                              maze2d.from_sim_vec(raw[:, 2:4])], axis=1)
        term = np.asarray(ep.terminations, dtype=bool)
        parts["observations"].append(obs[:-1])
        parts["next_observations"].append(obs[1:])
        parts["actions"].append(maze2d.from_sim_vec(np.asarray(ep.actions, dtype=np.float64)))
        parts["terminals"].append(term)
        parts["timeouts"].append(np.asarray(ep.truncations, dtype=bool) & ~term)
    if not parts["observations"]:
        raise DatasetError(f"{source}: the Minari dataset has no episodes")
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    obs = arrays["observations"]
    arrays["rewards"] = maze2d.reward(obs[:, :2].astype(np.float32), maze.goal, reward_type)
    return Dataset(name=name, source=source, qpos=obs[:, :2].copy(), qvel=obs[:, 2:4].copy(),
                   extra={"rewards": "relabelled to the evaluation goal"}, **arrays)


def minari_to_dataset(minari_ds, name: str, source: str = "") -> Dataset:
    """Flatten Minari episodes (T+1 observations, T actions) into D4RL's transition arrays.

    terminations -> terminals, truncations -> timeouts (never both: a terminal wins), and
    qpos/qvel from the step infos when recorded (infos hold T+1 entries, the first from reset,
    so infos[:-1] is the state at each transition's observation).
    """
    parts: dict[str, list[np.ndarray]] = {k: [] for k in (
        "observations", "actions", "rewards", "next_observations", "terminals", "timeouts",
        "qpos", "qvel")}
    has_states = True
    for ep in minari_ds.iterate_episodes():
        obs = np.asarray(ep.observations)
        if obs.ndim != 2:
            raise DatasetError(f"{source}: only flat Box observations are supported, episode "
                               f"{ep.id} has observations of shape {obs.shape}")
        term = np.asarray(ep.terminations, dtype=bool)
        parts["observations"].append(obs[:-1])
        parts["next_observations"].append(obs[1:])
        parts["actions"].append(np.asarray(ep.actions))
        parts["rewards"].append(np.asarray(ep.rewards))
        parts["terminals"].append(term)
        parts["timeouts"].append(np.asarray(ep.truncations, dtype=bool) & ~term)
        infos = ep.infos or {}
        if has_states and "qpos" in infos and "qvel" in infos:
            parts["qpos"].append(np.asarray(infos["qpos"])[: len(term)])
            parts["qvel"].append(np.asarray(infos["qvel"])[: len(term)])
        else:
            has_states = False
    if not parts["observations"]:
        raise DatasetError(f"{source}: the Minari dataset has no episodes")
    arrays = {k: np.concatenate(v) for k, v in parts.items() if v and (has_states or
                                                                         k not in ("qpos", "qvel"))}
    return Dataset(name=name, source=source, **arrays)


def import_step(spec: dict, log_fn=None) -> dict:
    """Job step: read a task's dataset (D4RL hdf5 / Minari / a user's file, `data.files`) into
    the results folder, after the input checks and the dynamics-consistency check has chosen
    the simulator model it replays in (recorded as the file's `sim_model` attr, which
    evaluation and the rollout-error study use); its verdict and provenance go next to it
    (harness.data.record: `<task>.data.json`) and into the run's MLflow tags."""
    from harness.config import from_dict
    from harness.data import consistency, record
    from harness.data.d4rl import write_hdf5
    cfg = from_dict(consistency.ConsistencyConfig, spec["config"].get("consistency"),
                    where=consistency.CONFIG_KEY)
    name = spec["config"]["name"]
    origin = "minari" if is_minari_id(name) else "file" if is_path(name) else "d4rl"
    dataset = load_dataset(name, task=spec["task"] if origin == "file" else None)
    dataset.name = spec["task"]
    report = consistency.check(dataset, cfg)
    rec = record.imported(spec["task"], origin, name if origin == "minari" else
                          str(dataset.source), report, dataset)
    write_hdf5(dataset, spec["out"], source=str(dataset.source), **consistency.attrs(report))
    record.write_record(spec["out"], rec)
    return {**dataset.summary(), **consistency.metrics(report),
            "tags": {"sim_model": report["sim_model"],
                     "consistency_status": report["status"],
                     "recorded_mujoco": report.get("recorded_mujoco", "unknown"),
                     **record.mlflow_tags(rec)}}
