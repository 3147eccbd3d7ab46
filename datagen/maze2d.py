"""D4RL's maze2d datasets, generated locally: a waypoint controller driving the point mass to
random goals in one continuing stream (scripts/generation/generate_maze2d_datasets.py, then
relabel_maze2d_rewards.py for the rewards; d4rl/pointmaze/waypoint_controller.py,
q_iteration.py).

Recipe, as D4RL's:
- one stream, never reset: a random goal (a free cell + U(-0.1, 0.1) per axis, MazeEnv.set_target)
  is driven to until the controller reports it reached or `max_episode_steps` have passed
  since the last goal; then a new goal is drawn and the point carries on from where it is;
- `timeouts` marks those rows (goal reached or time up: the released files' "timeouts", per
  the D4RL maintainers a split point of the stream, D4RL issue #85); `terminals` are all false;
- optional Gaussian action noise (the script's --noisy: std 0.5), then clipping to [-1, 1];
- rewards relabelled against the task's FIXED evaluation goal (the 'G' cell), of the row's
  *observation* (relabel_maze2d_rewards.py computes them from `observations`, not the next
  ones: the released files' off-by-one, D4RL issue #194), sparse or dense by the task name;
- infos/qpos, infos/qvel: the state at each observation (D4RL coordinates, = the observation).
Deliberate deviations: after a goal change D4RL's script keeps the previous row's observation
(`s = ns` sits in its else branch), so the next row's observation is stale while its qpos is
not; here every row's observation is its true state. The controller's goal (D4RL's
infos/goal) is not stored: the Dataset/hdf5 layer holds qpos/qvel only. The last row is
flagged as a timeout so every episode is complete (as datagen.generate.collect does).
The stream does not depend on the reward type: the same seed gives a maze's sparse and dense
data the same transitions (D4RL's dense files are its sparse ones relabelled).
"""
from __future__ import annotations

import math

import numpy as np
from tqdm.auto import tqdm

from harness.data.dataset import Dataset
from harness.maze2d import Maze, Maze2dEnv, parse_task, reward, task_name

# gridcraft/grid_env.py ACT_DICT in action order NOOP, UP, DOWN, LEFT, RIGHT, as (row, col)
# offsets: D4RL's grid x is the row, y the column, like its positions.
GRID_MOVES = np.array([[0, 0], [0, -1], [0, 1], [-1, 0], [1, 0]])
Q_ITERATIONS, DISCOUNT = 50, 0.99   # WaypointController._new_target: q_iteration(50, 0.99)
MAX_WAYPOINTS = 100                 # its rollout length in the grid
WAYPOINT_NOISE = 0.2                # waypoint = cell - U(0, 1)^2 * 0.2 (all but the goal cell)
NOISY_ACTION_STD = 0.5              # generate_maze2d_datasets.py --noisy


def _norm(v) -> float:
    return math.hypot(v[0], v[1])  # np.linalg.norm costs ~10x more on a 2-vector


class WaypointController:
    """D4RL's WaypointController: plan a shortest path over the grid by Q-iteration, then PD
    control (action = p * (waypoint - position) + d * velocity, clipped to [-1, 1]) towards
    the next waypoint, switching to the following one within `solve_thresh` of it.

    The grid planner is D4RL's (50 iterations of Q-iteration, discount 0.99, reward 1 in the
    goal cell, deterministic moves, argmax with ties to the lower action index), vectorised
    over the grid and cached per goal cell. `rng` draws the waypoints' noise."""

    def __init__(self, maze: Maze, rng: np.random.Generator, solve_thresh: float = 0.1,
                 p_gain: float = 10.0, d_gain: float = -1.0, vel_thresh: float = 0.1):
        self.maze, self.rng = maze, rng
        self.solve_thresh, self.p_gain, self.d_gain = solve_thresh, p_gain, d_gain
        self.vel_thresh = vel_thresh
        h, w = maze.shape
        cells = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1)
        nxt = cells[:, :, None, :] + GRID_MOVES                            # (h, w, 5, 2)
        inside = ((nxt >= 0) & (nxt < (h, w))).all(-1)
        legal = inside & ~maze.walls[nxt[..., 0].clip(0, h - 1), nxt[..., 1].clip(0, w - 1)]
        nxt = np.where(legal[..., None], nxt, cells[:, :, None, :])       # blocked: stay
        self._next = (nxt[..., 0] * w + nxt[..., 1]).reshape(h * w, len(GRID_MOVES))
        self._policies: dict[int, np.ndarray] = {}
        self._target = np.zeros(2)    # D4RL starts from -1000 * ONES, and ONES is zeros
        self._waypoints: list[np.ndarray] = []
        self._idx = 0
        self._prev_loc = np.zeros(2)

    def _policy(self, target: int) -> np.ndarray:
        """Greedy grid action per cell towards `target` (flat index), D4RL's Q-iteration."""
        if target not in self._policies:
            r = np.zeros(len(self._next))
            r[target] = 1.0
            q = np.zeros(self._next.shape)
            for _ in range(Q_ITERATIONS):
                q = r[:, None] + DISCOUNT * q.max(1)[self._next]
            self._policies[target] = q.argmax(1)
        return self._policies[target]

    @staticmethod
    def gridify(pos) -> np.ndarray:
        return np.rint(np.asarray(pos, dtype=np.float64))  # Python's round: half to even

    def _new_target(self, start, target) -> None:
        w = self.maze.shape[1]
        start, target = self.gridify(start).astype(int), self.gridify(target).astype(int)
        goal = target[0] * w + target[1]
        policy, s = self._policy(goal), start[0] * w + start[1]
        waypoints = []
        for _ in range(MAX_WAYPOINTS):
            s = self._next[s, policy[s]]
            cell = np.array(divmod(s, w), dtype=np.float64)
            if s != goal:
                cell -= self.rng.uniform(size=2) * WAYPOINT_NOISE
            waypoints.append(cell)
            if s == goal:
                break
        self._waypoints, self._idx = waypoints, 0
        self._prev_loc, self._target = start.astype(np.float64), target.astype(np.float64)

    def get_action(self, location, velocity, target) -> tuple[np.ndarray, bool]:
        """(action, reached) for the point at `location` with `velocity` heading for `target`
        (D4RL coordinates). A target in another cell than the current one replans; the
        controller aims at the target's cell index, as D4RL's does."""
        location = np.asarray(location, dtype=np.float64)
        if _norm(self._target - self.gridify(target)) > 1e-3:
            self._new_target(location, target)
        moved = _norm(self._prev_loc - location)  # D4RL's "vel": per-step motion
        solved = (_norm(location - self._target) < self.solve_thresh
                  and moved < self.vel_thresh)
        waypoint = self._target if solved else self._waypoints[self._idx]
        action = self.p_gain * (waypoint - location) + self.d_gain * np.asarray(velocity)
        if (not solved and _norm(location - waypoint) < self.solve_thresh
                and moved < self.vel_thresh):
            # D4RL indexes past the end here only if the grid path missed the goal; stay.
            self._idx = min(self._idx + 1, len(self._waypoints) - 1)
        self._prev_loc = location
        return np.clip(action, -1.0, 1.0), solved


def random_goal(maze: Maze, rng: np.random.Generator) -> np.ndarray:
    """D4RL's MazeEnv.set_target(): a free cell (goal cell included) + U(-0.1, 0.1) per axis."""
    cells = maze.free_cells
    return cells[rng.integers(len(cells))] + rng.uniform(-0.1, 0.1, 2)


def maze2d_dataset(task: str, n_transitions: int, seed: int, progress: bool = False, *,
                   action_noise: float = 0.0) -> Dataset:
    """`n_transitions` of D4RL's maze2d recipe (module docstring) for `task` ('maze2d-umaze',
    'maze2d-large-dense', ...), named like the task without version. `action_noise`: std of
    the Gaussian added to the controller's action (D4RL's noisy variant: NOISY_ACTION_STD).
    Same seed -> identical arrays."""
    maze, reward_type = parse_task(task)
    if n_transitions <= 0:
        raise ValueError(f"n_transitions must be positive, got {n_transitions}")
    if action_noise < 0:
        raise ValueError(f"action_noise must be >= 0, got {action_noise}")
    env_seed, ctrl_seed, goal_seed, noise_seed = np.random.SeedSequence(seed).spawn(4)
    goal_rng, noise_rng = np.random.default_rng(goal_seed), np.random.default_rng(noise_seed)
    env = Maze2dEnv(maze.name, reward_type)
    controller = WaypointController(maze, np.random.default_rng(ctrl_seed))
    obs_buf = np.empty((n_transitions, 4))
    next_buf = np.empty((n_transitions, 4))
    act_buf = np.empty((n_transitions, 2))
    ends = np.zeros(n_transitions, dtype=bool)
    try:
        goal = random_goal(maze, goal_rng)  # D4RL: env.set_target(), then env.reset()
        obs, _ = env.reset(seed=int(env_seed.generate_state(1)[0]))
        steps = 0  # since the last goal change (D4RL's ts)
        for t in tqdm(range(n_transitions), desc=task_name(maze.name, reward_type),
                      disable=not progress, leave=False):
            action, reached = controller.get_action(obs[:2], obs[2:], goal)
            if action_noise:
                action = action + noise_rng.standard_normal(2) * action_noise
            action = np.clip(action, -1.0, 1.0)
            ends[t] = reached or steps >= maze.max_episode_steps
            obs_buf[t], act_buf[t] = obs, action
            obs = next_buf[t] = env.step(action)[0]
            steps += 1
            if ends[t]:
                goal, steps = random_goal(maze, goal_rng), 0
    finally:
        env.close()
    ends[-1] = True
    # Of the stored (float32) observation, as relabel_maze2d_rewards.py computed them.
    rewards = reward(obs_buf[:, :2].astype(np.float32), maze.goal, reward_type)
    return Dataset(obs_buf, act_buf, rewards, next_buf, np.zeros(n_transitions, dtype=bool),
                   ends, name=task_name(maze.name, reward_type), qpos=obs_buf[:, :2].copy(),
                   qvel=obs_buf[:, 2:].copy(), source="generated")
