"""D4RL's maze2d tasks (umaze, medium, large; sparse and dense) on gymnasium-robotics' PointMaze.

The task is D4RL's `maze2d-<maze>-v1` (d4rl/pointmaze/maze_model.py, __init__.py): a 2-D point
mass pushed by a force in [-1, 1]^2 towards a fixed goal, the 'G' cell of the layout; reward
sparse 1 iff ||pos - goal|| <= 0.5, dense exp(-||pos - goal||), both of the position after the
step; never terminates; 300 / 600 / 800 steps per episode. Reset: a uniformly chosen free cell
(goal cell included) + U(-0.1, 0.1) per axis, velocity N(0, 0.1^2) per axis.

Simulator: gymnasium-robotics' `PointMazeEnv` (v3 ids `PointMaze_UMaze-v3`, ...) built with
D4RL's layout. Its MJCF (assets/point/point.xml) has D4RL's values: timestep 0.01, Euler, 20
solver iterations, joint damping 1, gear 100, ctrl range +-1, sphere radius 0.1, density 1000,
friction .5, condim 1, margin 0.002, frame skip 1, and the same step (clip the action to
+-1, clip qvel to +-5, one mj_step). What differs is only where things sit (walls are cells of
side 1 either way; the point starts elsewhere; the walls' z extent is [0, 0.4] vs [-0.2, 0.2]),
so the dynamics agree after the rigid change of coordinates below:
tests/test_maze2d.py builds D4RL's own point mass from maze_model.py's specification and
replays random pushes through the walls in both, to ~1e-9 in position and velocity (float64
rounding of the offset). One simulator model per maze therefore serves D4RL's files and local
data (`TaskSpec.models` = the PointMaze id). D4RL recorded with MuJoCo 2.0 (mujoco-py); what
that version changes cannot be measured here and would be the same for either model. The
reset distribution, goal and reward are D4RL's, implemented here; PointMaze's own differ
(+-0.25 reset noise, no velocity noise, random goals, sparse radius 0.45).

Coordinates. The layout is a list of rows; cell (i, j) is row i, column j (H rows, W columns).
D4RL (observations, qpos, qvel, actions, goal): x runs along the rows and y along the
columns: its MJCF puts wall (i, j) at (i + 1, j + 1) and the particle's body at (1.2, 1.2),
so qpos = (a, b) is the world point (a + 1.2, b + 1.2) and the *centre* of cell (i, j) is
qpos (i - 0.2, j - 0.2); D4RL's goals and reset locations are the integer cell indices
(i, j), 0.2 past the centre along both axes (D4RL's own offset, kept: it is its task).
PointMaze: the maze is centred on the origin, x along the columns, y up the rows,
cell (i, j) centred at (j + 0.5 - W/2, H/2 - i - 0.5), the particle's body at 0. Hence

    x_pm = b + 0.7 - W/2,   y_pm = H/2 - 0.7 - a        (a, b: D4RL position)
    vx_pm = vb,             vy_pm = -va                 (same for the force: u_pm = (u1, -u0))

a rotation by -90 degrees plus a shift, no scaling (both use cells of side 1).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

FAMILY = "maze2d"
REWARD_TYPES = ("sparse", "dense")
SPARSE_RADIUS = 0.5       # maze_model.py MazeEnv.step: reward 1 iff distance <= 0.5
VELOCITY_CLIP = 5.0       # MazeEnv.clip_velocity (PointMaze's PointEnv._clip_velocity)
RESET_POS_NOISE = 0.1     # MazeEnv.reset_model: cell + U(-0.1, 0.1)
RESET_VEL_STD = 0.1       # MazeEnv.reset_model: init_qvel (0) + randn * 0.1
BODY_OFFSET = 0.2         # D4RL's particle body sits at (1.2, 1.2), walls at index + 1


@dataclass(frozen=True)
class Maze:
    """One D4RL layout and its -v1 task settings (d4rl/pointmaze/__init__.py, infos.py)."""
    name: str                          # 'umaze' | 'medium' | 'large'
    layout: tuple[str, ...]            # rows; '#' wall, 'O' free, 'G' free + evaluation goal
    max_episode_steps: int
    ref_sparse: tuple[float, float]    # REF_MIN_SCORE, REF_MAX_SCORE of maze2d-<name>-v1
    ref_dense: tuple[float, float]     # ... of maze2d-<name>-dense-v1
    pointmaze_id: str                  # the gymnasium-robotics env with this layout

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.layout), len(self.layout[0])

    @property
    def walls(self) -> np.ndarray:
        """(H, W) bool."""
        return np.array([[c == "#" for c in row] for row in self.layout])

    @property
    def goal(self) -> np.ndarray:
        """The evaluation goal in D4RL coordinates: the 'G' cell's index (MazeEnv.set_target)."""
        return np.argwhere(np.array([list(r) for r in self.layout]) == "G")[0].astype(np.float64)

    @property
    def free_cells(self) -> np.ndarray:
        """(n, 2) int cells in D4RL's order of `empty_and_goal_locations` (sorted empty cells,
        then the goal): where resets (and the data's random goals) are drawn from."""
        grid = np.array([list(r) for r in self.layout])
        return np.concatenate([np.argwhere(grid == "O"), np.argwhere(grid == "G")])

    def ref_scores(self, reward_type: str) -> tuple[float, float]:
        return self.ref_sparse if reward_type == "sparse" else self.ref_dense


# d4rl/pointmaze/maze_model.py U_MAZE, MEDIUM_MAZE, LARGE_MAZE (the same maps as
# gymnasium-robotics' maps.U_MAZE, MEDIUM_MAZE, LARGE_MAZE); reference returns of the -v1 ids.
MAZES: dict[str, Maze] = {
    "umaze": Maze("umaze", ("#####",
                            "#GOO#",
                            "###O#",
                            "#OOO#",
                            "#####"),
                  300, (23.85, 161.86), (68.537689, 193.66285642381482), "PointMaze_UMaze-v3"),
    "medium": Maze("medium", ("########",
                              "#OO##OO#",
                              "#OO#OOO#",
                              "##OOO###",
                              "#OO#OOO#",
                              "#O#OO#O#",
                              "#OOO#OG#",
                              "########"),
                   600, (13.13, 277.39), (44.264742, 297.4552547777125), "PointMaze_Medium-v3"),
    "large": Maze("large", ("############",
                            "#OOOO#OOOOO#",
                            "#O##O#O#O#O#",
                            "#OOOOOO#OOO#",
                            "#O####O###O#",
                            "#OO#O#OOOOO#",
                            "##O#O#O#O###",
                            "#OO#OOO#OGO#",
                            "############"),
                  800, (6.7, 273.99), (30.569041, 303.4857382709002), "PointMaze_Large-v3"),
}

# The dataset kinds of the family: '<maze>' (sparse) and '<maze>-dense' (D4RL -v1 names).
KINDS = tuple(MAZES) + tuple(f"{m}-dense" for m in MAZES)


def parse_task(name: str) -> tuple[Maze, str]:
    """'maze2d-umaze', 'maze2d-umaze-dense-v1', 'maze2d-large-sparse-v1' -> (Maze, reward type)."""
    parts = name.lower().split("-")
    if parts and parts[-1][:1] == "v" and parts[-1][1:].isdigit():
        parts = parts[:-1]
    reward_type = "sparse"
    if len(parts) == 3 and parts[2] in REWARD_TYPES:
        reward_type = parts.pop()
    if len(parts) != 2 or parts[0] != FAMILY or parts[1] not in MAZES:
        raise KeyError(f"unknown maze2d task {name!r}: known are "
                       f"{[f'{FAMILY}-{k}' for k in KINDS]} (optionally with -v1)")
    return MAZES[parts[1]], reward_type


def task_name(maze: str, reward_type: str) -> str:
    """Canonical (D4RL -v1 without the version) name: 'maze2d-umaze', 'maze2d-umaze-dense'."""
    return f"{FAMILY}-{maze}" + ("-dense" if reward_type == "dense" else "")


# ---- coordinates (vectorised over leading dimensions) ----------------------------------------

# D4RL (a, b) -> PointMaze (b, -a) as a row-vector product: vec @ _ROTATE (matmul, not
# np.stack: it is on the per-step path of data generation).
_ROTATE = np.array([[0.0, -1.0], [1.0, 0.0]])


def _offset(maze: Maze) -> np.ndarray:
    h, w = maze.shape
    return np.array([0.5 + BODY_OFFSET - w / 2, h / 2 - 0.5 - BODY_OFFSET])


def to_sim_pos(maze: Maze, pos) -> np.ndarray:
    """D4RL position(s) (..., 2) -> PointMaze position(s)."""
    return to_sim_vec(pos) + _offset(maze)


def from_sim_pos(maze: Maze, xy) -> np.ndarray:
    """PointMaze position(s) (..., 2) -> D4RL position(s)."""
    return from_sim_vec(np.asarray(xy, dtype=np.float64) - _offset(maze))


def to_sim_vec(vec) -> np.ndarray:
    """D4RL velocity or force (..., 2) -> PointMaze's (the rotation part of to_sim_pos)."""
    return np.asarray(vec, dtype=np.float64) @ _ROTATE


def from_sim_vec(vec) -> np.ndarray:
    return np.asarray(vec, dtype=np.float64) @ _ROTATE.T


def reward(pos, goal, reward_type: str):
    """D4RL's maze2d reward of position(s) (..., 2) w.r.t. `goal` (D4RL coordinates)."""
    dist = np.linalg.norm(np.asarray(pos, dtype=np.float64) - goal, axis=-1)
    if reward_type == "sparse":
        return (dist <= SPARSE_RADIUS).astype(np.float64)
    if reward_type == "dense":
        return np.exp(-dist)
    raise ValueError(f"reward_type must be one of {REWARD_TYPES}, got {reward_type!r}")


# ---- the environment -------------------------------------------------------------------------

class Maze2dEnv(gym.Env):
    """D4RL's maze2d-<maze>[-dense]-v1 on a gymnasium-robotics PointMaze simulator.

    Observations (x, y, vx, vy) and actions in D4RL's coordinates (module docstring); no time
    limit (`make` adds it). `set_state(qpos, qvel)` / `_get_obs()` / `state()` speak D4RL
    coordinates too; `data` and `model` are the MuJoCo objects, in PointMaze coordinates."""

    metadata = {"render_modes": []}

    def __init__(self, maze: str, reward_type: str = "sparse"):
        if maze not in MAZES:
            raise KeyError(f"unknown maze {maze!r}: known are {list(MAZES)}")
        if reward_type not in REWARD_TYPES:
            raise ValueError(f"reward_type must be one of {REWARD_TYPES}, got {reward_type!r}")
        from gymnasium_robotics.envs.maze.point_maze import PointMazeEnv
        self.maze, self.reward_type = MAZES[maze], reward_type
        self.goal = self.maze.goal
        # Free cells as 0 (no 'r'/'g' cells): PointMaze's own goal/reset sampling is unused.
        sim_map = [[int(c == "#") for c in row] for row in self.maze.layout]
        self._env = PointMazeEnv(maze_map=sim_map, continuing_task=True, reset_target=False)
        # PointMaze writes its MJCF to a temporary file it never removes; the model is loaded.
        try:
            os.remove(self._env.tmp_xml_file_path)
        except OSError:
            pass
        self._env.reset(seed=0)  # defines PointMaze's own goal, which its step reads
        self._sim = self._env.point_env
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (4,), np.float64)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    @property
    def data(self):
        return self._sim.data

    @property
    def model(self):
        return self._sim.model

    def state(self) -> tuple[np.ndarray, np.ndarray]:
        """(qpos, qvel) in D4RL coordinates."""
        return from_sim_pos(self.maze, self.data.qpos), from_sim_vec(self.data.qvel)

    def _get_obs(self) -> np.ndarray:
        qpos, qvel = self.state()
        return np.concatenate([qpos, qvel])

    def set_state(self, qpos, qvel) -> None:
        """Put the point at D4RL position `qpos` with D4RL velocity `qvel`."""
        self._sim.set_state(to_sim_pos(self.maze, qpos), to_sim_vec(qvel))

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        cells = self.maze.free_cells
        cell = cells[self.np_random.integers(len(cells))]
        self.set_state(cell + self.np_random.uniform(-RESET_POS_NOISE, RESET_POS_NOISE, 2),
                       self.np_random.standard_normal(2) * RESET_VEL_STD)
        return self._get_obs(), {}

    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        self._env.step(to_sim_vec(action))  # PointMaze clips qvel to +-5, then one mj_step
        obs = self._get_obs()
        return obs, float(reward(obs[:2], self.goal, self.reward_type)), False, False, {}

    def close(self) -> None:
        self._env.close()


def make(name: str, seed: int | None = None) -> gym.Env:
    """The maze2d task `name` with its time limit (D4RL's max_episode_steps)."""
    maze, reward_type = parse_task(name)
    env = gym.wrappers.TimeLimit(Maze2dEnv(maze.name, reward_type), maze.max_episode_steps)
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env
