"""MuJoCo tasks: gymnasium factories, D4RL reference scores, termination functions, state restore.

Observation layouts match D4RL's (locomotion: qpos without the x position, then qvel; maze2d:
position then velocity, harness/maze2d.py), so D4RL files, Minari datasets and locally generated
ones share one format. Termination functions mirror gymnasium's v5 `is_healthy` checks and are
vectorised over a batch of next observations (numpy or torch).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gymnasium as gym
import numpy as np

from harness import maze2d


@dataclass(frozen=True)
class TaskSpec:
    family: str          # hopper | halfcheetah | walker2d | maze2d
    gym_id: str          # gymnasium MuJoCo v5 id (maze2d: the gymnasium-robotics PointMaze id)
    obs_dim: int
    act_dim: int
    ref_min_score: float  # D4RL's REF_MIN_SCORE (random policy return)
    ref_max_score: float  # D4RL's REF_MAX_SCORE (expert return)
    max_episode_steps: int = 1000
    # Simulator models (files in gymnasium's mujoco/assets; maze2d: the PointMaze id) a dataset
    # may have been recorded with; the first is the gym id's own. harness.data.consistency
    # picks one per dataset.
    models: tuple[str, ...] = ()
    # The observation clips qvel to +-this (gymnasium hopper_v5.py / walker2d_v5.py _get_obs).
    qvel_clip: float | None = None


# Reference returns from d4rl/infos.py (the -v1/-v2 datasets reuse the -v0 values).
# Walker2d-v5 gives both feet friction 1.9 (walker2d_v5.xml); v2-v4, which D4RL recorded,
# used walker2d.xml (right foot 0.9, left 1.9): gymnasium's walker2d_v5.py changelog.
TASKS: dict[str, TaskSpec] = {
    "hopper": TaskSpec("hopper", "Hopper-v5", 11, 3, -20.272305, 3234.3,
                       models=("hopper.xml",), qvel_clip=10.0),
    "halfcheetah": TaskSpec("halfcheetah", "HalfCheetah-v5", 17, 6, -280.178953, 12135.0,
                            models=("half_cheetah.xml",)),
    "walker2d": TaskSpec("walker2d", "Walker2d-v5", 17, 6, 1.629008, 4592.3,
                         models=("walker2d_v5.xml", "walker2d.xml"), qvel_clip=10.0),
}

DATASET_KINDS = ("random", "medium", "medium-replay", "medium-expert", "expert")
FAMILIES = (*TASKS, maze2d.FAMILY)


def dataset_kinds(family: str) -> tuple[str, ...]:
    """The dataset kinds of a family: 'maze2d-umaze-dense' = family 'maze2d' + kind
    'umaze-dense'; the locomotion families share DATASET_KINDS."""
    if family == maze2d.FAMILY:
        return maze2d.KINDS
    if family not in TASKS:
        raise KeyError(f"unknown task family {family!r}: known are {list(FAMILIES)}")
    return DATASET_KINDS


def _maze_spec(name: str) -> TaskSpec:
    maze, reward_type = maze2d.parse_task(name)
    lo, hi = maze.ref_scores(reward_type)
    return TaskSpec(maze2d.FAMILY, maze.pointmaze_id, 4, 2, lo, hi,
                    max_episode_steps=maze.max_episode_steps, models=(maze.pointmaze_id,))


def task_spec(name: str) -> TaskSpec:
    """Spec for a family ('hopper') or a D4RL/Minari dataset name ('hopper-medium-v2');
    maze2d needs the maze ('maze2d-umaze', 'maze2d-large-dense-v1'): each has its own goal,
    episode length and reference returns."""
    family = family_of(name)
    if family == maze2d.FAMILY:
        return _maze_spec(name)
    return TASKS[family]


def family_of(name: str) -> str:
    """'hopper-medium-replay-v2' -> 'hopper'; 'mujoco/walker2d/medium-v0' -> 'walker2d';
    'maze2d-umaze-dense-v1' -> 'maze2d'."""
    key = name.lower()
    if key.startswith("mujoco/"):
        key = key.split("/")[1]
    family = key.split("-")[0]
    if family not in FAMILIES:
        raise KeyError(f"unknown task {name!r}: known task families are {sorted(FAMILIES)} "
                       f"(dataset names like 'hopper-medium-v2', 'mujoco/hopper/medium-v0' "
                       f"or 'maze2d-umaze-v1')")
    return family


def normalized_score(name: str, returns):
    """D4RL normalised score: 100 * (R - random) / (expert - random)."""
    spec = task_spec(name)
    return 100.0 * (np.asarray(returns, dtype=np.float64) - spec.ref_min_score) / (
        spec.ref_max_score - spec.ref_min_score)


def model_file(model: str) -> Path:
    """The installed gymnasium's copy of a MuJoCo model file ('walker2d.xml')."""
    import gymnasium.envs.mujoco as mujoco_envs
    path = Path(mujoco_envs.__file__).resolve().parent / "assets" / model
    if not path.exists():
        raise FileNotFoundError(f"simulator model {model!r}: no {path} in the installed "
                                f"gymnasium {gym.__version__}")
    return path


def make_env(name: str, seed: int | None = None, model: str | None = None,
             **kwargs) -> gym.Env:
    """A gymnasium MuJoCo v5 env for the task family of `name` (with its 1000-step limit);
    maze2d: D4RL's maze task on PointMaze (harness.maze2d.make, its 300/600/800-step limit).

    `model`: one of the task's `TaskSpec.models` (the one recorded with a dataset); None or
    the first is the gym id's own model."""
    spec = task_spec(name)
    if spec.family == maze2d.FAMILY:
        if model not in (None, *spec.models) or kwargs:
            raise ValueError(f"{name}: simulator model {model!r} / options {sorted(kwargs)}: "
                             f"a maze2d task has the one model {list(spec.models)}, no options")
        return maze2d.make(name, seed)
    if model is not None and model != spec.models[0]:
        if model not in spec.models:
            raise ValueError(f"simulator model {model!r} is not one of {spec.family}'s models "
                             f"{list(spec.models)}")
        kwargs["xml_file"] = str(model_file(model))
    env = gym.make(spec.gym_id, max_episode_steps=spec.max_episode_steps, **kwargs)
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


def sim_state(env: gym.Env) -> tuple[np.ndarray, np.ndarray]:
    """The simulator's (qpos, qvel) as datasets store them (maze2d: D4RL's coordinates, not
    the PointMaze MuJoCo model's own); copies."""
    base = env.unwrapped
    if isinstance(base, maze2d.Maze2dEnv):
        return base.state()
    return base.data.qpos.copy(), base.data.qvel.copy()


def restore_state(env: gym.Env, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
    """Put the simulator exactly in (qpos, qvel) and return the matching observation
    (maze2d: position and velocity in D4RL's coordinates, as its files store them)."""
    base = env.unwrapped
    base.set_state(np.asarray(qpos, dtype=np.float64), np.asarray(qvel, dtype=np.float64))
    return base._get_obs()


def _xp(x):
    """Array namespace (numpy or torch) of x, so one formula serves both."""
    if isinstance(x, np.ndarray):
        return np
    import torch
    return torch


def alive_mask(terminals):
    """(N, T) terminal flags -> (N, T) bool: step t happens iff no terminal came before it (the
    terminal step itself is kept). numpy or torch."""
    xp = _xp(terminals)
    done = terminals.astype(np.int64) if xp is np else terminals.long()
    return (xp.cumsum(done, 1) if xp is np else done.cumsum(1)) - done == 0


def hopper_termination(next_obs):
    # gymnasium Hopper-v5: healthy iff all(|state[1:]| < 100), z > 0.7, |angle| < 0.2,
    # where the observation is qpos[1:] ++ qvel, so z = obs[0], angle = obs[1].
    xp = _xp(next_obs)
    z, angle = next_obs[..., 0], next_obs[..., 1]
    healthy = (xp.abs(next_obs[..., 1:]) < 100).all(-1) & (z > 0.7) & (xp.abs(angle) < 0.2)
    finite = xp.isfinite(next_obs).all(-1)
    return ~(healthy & finite)


def walker2d_termination(next_obs):
    # gymnasium Walker2d-v5: healthy iff 0.8 < z < 2.0 and -1 < angle < 1.
    xp = _xp(next_obs)
    z, angle = next_obs[..., 0], next_obs[..., 1]
    healthy = (z > 0.8) & (z < 2.0) & (angle > -1.0) & (angle < 1.0)
    return ~(healthy & xp.isfinite(next_obs).all(-1))


def halfcheetah_termination(next_obs):
    # HalfCheetah never terminates; a non-finite model state is still treated as terminal.
    return ~_xp(next_obs).isfinite(next_obs).all(-1)


TERMINATION_FNS: dict[str, Callable] = {
    "hopper": hopper_termination,
    "walker2d": walker2d_termination,
    "halfcheetah": halfcheetah_termination,
    maze2d.FAMILY: halfcheetah_termination,  # D4RL's MazeEnv never terminates either
}


def termination_fn(name: str) -> Callable:
    """Vectorised `done = f(next_obs)` (bool array/tensor of shape batch) for the task."""
    return TERMINATION_FNS[family_of(name)]
