"""D4RL's maze2d on PointMaze: coordinates, reward and goal, dynamics equal to D4RL's point mass,
the waypoint controller, generated data through validation / hdf5 / consistency replay."""
from __future__ import annotations

import mujoco
import numpy as np
import pytest

from datagen.maze2d import WaypointController, maze2d_dataset
from harness import maze2d
from harness.data import consistency
from harness.data.d4rl import read_hdf5, write_hdf5
from harness.data.dataset import Dataset
from harness.envs import (dataset_kinds, family_of, make_env, normalized_score, restore_state,
                          task_spec, termination_fn)
from harness.maze2d import MAZES, Maze2dEnv

TASKS = ("maze2d-umaze", "maze2d-medium", "maze2d-large",
         "maze2d-umaze-dense", "maze2d-medium-dense", "maze2d-large-dense")
# d4rl/infos.py REF_MIN_SCORE / REF_MAX_SCORE of the -v1 ids; max_episode_steps of __init__.py.
D4RL_REFS = {"maze2d-umaze": (23.85, 161.86), "maze2d-medium": (13.13, 277.39),
             "maze2d-large": (6.7, 273.99),
             "maze2d-umaze-dense": (68.537689, 193.66285642381482),
             "maze2d-medium-dense": (44.264742, 297.4552547777125),
             "maze2d-large-dense": (30.569041, 303.4857382709002)}
STEPS = {"umaze": 300, "medium": 600, "large": 800}


def d4rl_point_mass(maze: maze2d.Maze) -> mujoco.MjModel:
    """D4RL's own model, written from d4rl/pointmaze/maze_model.py point_maze(): particle body
    at (1.2, 1.2), wall (i, j) a box of half-size (0.5, 0.5, 0.2) at (i + 1, j + 1, 0)."""
    walls = "".join(f'<geom type="box" conaffinity="1" pos="{i + 1.0} {j + 1.0} 0" '
                    f'size="0.5 0.5 0.2"/>' for i, j in np.argwhere(maze.walls))
    return mujoco.MjModel.from_xml_string(f"""
<mujoco><compiler inertiafromgeom="true" angle="radian"/>
 <option timestep="0.01" gravity="0 0 0" iterations="20" integrator="Euler"/>
 <default><joint damping="1" limited="false"/>
  <geom friction=".5 .1 .1" density="1000" margin="0.002" condim="1" contype="2"
        conaffinity="1"/></default>
 <worldbody>
  <geom type="plane" size="40 40 0.25" pos="0 0 -0.1" contype="1" conaffinity="0"/>
  <body pos="1.2 1.2 0"><geom type="sphere" size="0.1" contype="1"/>
   <joint name="x" type="slide" axis="1 0 0"/><joint name="y" type="slide" axis="0 1 0"/>
  </body>{walls}
 </worldbody>
 <actuator><motor joint="x" ctrlrange="-1 1" ctrllimited="true" gear="100"/>
  <motor joint="y" ctrlrange="-1 1" ctrllimited="true" gear="100"/></actuator>
</mujoco>""")


def d4rl_step(model, data, action) -> None:
    """MazeEnv.step: clip the action, clip qvel to +-5 (set_state: forward), one step."""
    data.qvel[:] = np.clip(data.qvel, -5.0, 5.0)
    mujoco.mj_forward(model, data)
    data.ctrl[:] = np.clip(action, -1.0, 1.0)
    mujoco.mj_step(model, data)


# ---- names and the harness's task interface ------------------------------------------------

@pytest.mark.parametrize("name,maze,kind", [("maze2d-umaze", "umaze", "sparse"),
                                            ("maze2d-medium-dense-v1", "medium", "dense"),
                                            ("maze2d-large-sparse-v1", "large", "sparse")])
def test_task_names(name, maze, kind):
    assert family_of(name) == "maze2d"
    spec = task_spec(name)
    assert (spec.family, spec.obs_dim, spec.act_dim) == ("maze2d", 4, 2)
    assert spec.max_episode_steps == STEPS[maze]
    assert maze2d.parse_task(name) == (MAZES[maze], kind)
    with pytest.raises(KeyError, match="maze2d-umaze-dense"):
        task_spec("maze2d-eval-umaze")


def test_dataset_kinds_split_task_names():
    kinds = dataset_kinds("maze2d")
    assert kinds == ("umaze", "medium", "large", "umaze-dense", "medium-dense", "large-dense")
    assert [f"maze2d-{k}" for k in kinds] == list(TASKS)
    assert "medium-replay" in dataset_kinds("hopper")


@pytest.mark.parametrize("task", TASKS)
def test_normalized_score_uses_the_mazes_own_references(task):
    lo, hi = D4RL_REFS[task]
    spec = task_spec(task + "-v1")
    assert (spec.ref_min_score, spec.ref_max_score) == (lo, hi)
    np.testing.assert_allclose(normalized_score(task, [lo, hi]), [0.0, 100.0], atol=1e-12)


# ---- coordinates -----------------------------------------------------------------------------

def test_coordinates_of_a_known_cell_and_back():
    umaze = MAZES["umaze"]  # 5 x 5: x_pm = b + 0.7 - 2.5, y_pm = 2.5 - 0.7 - a
    np.testing.assert_allclose(maze2d.to_sim_pos(umaze, [1.0, 1.0]), [-0.8, 0.8])
    np.testing.assert_allclose(maze2d.to_sim_pos(umaze, [3.0, 2.0]), [0.2, -1.2])
    np.testing.assert_allclose(maze2d.from_sim_pos(umaze, [0.2, -1.2]), [3.0, 2.0])
    env = make_env("maze2d-umaze", seed=0)
    obs = restore_state(env, np.array([3.0, 2.0]), np.array([0.5, -1.0]))
    np.testing.assert_allclose(obs, [3.0, 2.0, 0.5, -1.0], atol=1e-12)
    np.testing.assert_allclose(env.unwrapped.data.qpos, [0.2, -1.2], atol=1e-12)
    np.testing.assert_allclose(env.unwrapped.data.qvel, [-1.0, -0.5], atol=1e-12)  # (vb, -va)


@pytest.mark.parametrize("maze", list(MAZES))
def test_pointmaze_walls_sit_where_d4rl_puts_them(maze):
    """Every PointMaze wall box is centred at D4RL qpos (i - 0.2, j - 0.2) mapped to PointMaze
    (D4RL: wall (i, j) at world (i + 1, j + 1), particle body at (1.2, 1.2))."""
    env = Maze2dEnv(maze)
    model = env.model
    for i, j in np.argwhere(MAZES[maze].walls):
        gid = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_GEOM, f"block_{i}_{j}")
        assert gid >= 0, (i, j)
        want = maze2d.to_sim_pos(MAZES[maze], [i - 0.2, j - 0.2])
        np.testing.assert_allclose(model.geom_pos[gid][:2], want, atol=1e-12, err_msg=str((i, j)))
    env.close()


@pytest.mark.parametrize("maze", list(MAZES))
def test_dynamics_equal_d4rls_point_mass(maze):
    """Random pushes (held 20 steps, so the point hits walls) from every free cell, replayed
    in D4RL's model and in the env: same trajectory up to float64 rounding of the offset."""
    spec = MAZES[maze]
    model = d4rl_point_mass(spec)
    data = mujoco.MjData(model)
    env = Maze2dEnv(maze)
    rng = np.random.default_rng(0)
    worst, contact_steps = 0.0, 0
    for cell in spec.free_cells:
        qpos, qvel = cell + rng.uniform(-0.1, 0.1, 2), rng.normal(0, 0.1, 2)
        mujoco.mj_resetData(model, data)
        data.qpos[:], data.qvel[:] = qpos, qvel
        mujoco.mj_forward(model, data)
        env.set_state(qpos, qvel)
        for t in range(60):
            if t % 20 == 0:
                action = rng.uniform(-1.2, 1.2, 2)
            d4rl_step(model, data, action)
            obs = env.step(action)[0]
            contact_steps += data.ncon > 1  # the ground is always one contact
            worst = max(worst, np.abs(obs - np.concatenate([data.qpos, data.qvel])).max())
    env.close()
    assert contact_steps > 50
    assert worst < 1e-8, worst


def test_a_wall_stops_the_point_where_d4rls_geometry_says():
    """umaze cell (3, 1): wall (4, 1) has its face at D4RL x = 4 - 0.2 - 0.5 = 3.3; the
    sphere (radius 0.1) stops at ~3.2 (contact softness lets it in by a few mm)."""
    env = Maze2dEnv("umaze")
    env.set_state([3.0, 1.0], [0.0, 0.0])
    for _ in range(200):
        obs = env.step([1.0, 0.0])[0]
    assert 3.18 < obs[0] < 3.21 and abs(obs[1] - 1.0) < 1e-9, obs


# ---- reward, goal, episode end ---------------------------------------------------------------

@pytest.mark.parametrize("maze,goal", [("umaze", (1, 1)), ("medium", (6, 6)),
                                       ("large", (7, 9))])
def test_goal_is_the_g_cell(maze, goal):
    np.testing.assert_array_equal(MAZES[maze].goal, goal)


def test_reward_at_the_goal_and_0_6_away():
    goal = MAZES["umaze"].goal  # (1, 1); (1, 1.6) lies in free cell (1, 2)
    for name, at_goal, away in (("maze2d-umaze", 1.0, 0.0),
                                ("maze2d-umaze-dense", 1.0, np.exp(-0.6))):
        env = make_env(name, seed=0)
        for pos, want in ((goal, at_goal), (goal + [0.0, 0.6], away)):
            restore_state(env, pos, np.zeros(2))
            obs, r, *_ = env.step(np.zeros(2))  # no force, no velocity: it stays put
            np.testing.assert_allclose(obs[:2], pos, atol=1e-12)
            assert r == pytest.approx(want, abs=1e-12), (name, pos)
    assert maze2d.reward([1.0, 1.5], goal, "sparse") == 1.0  # the radius is inclusive
    assert maze2d.reward([1.0, 1.5 + 1e-9], goal, "sparse") == 0.0


@pytest.mark.parametrize("maze", list(MAZES))
def test_never_terminates_and_truncates_at_the_episode_length(maze):
    env = make_env(f"maze2d-{maze}", seed=1)
    obs, _ = env.reset(seed=1)
    for t in range(1, STEPS[maze] + 1):
        obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
        assert not terminated
        assert truncated == (t == STEPS[maze]), t
    done = termination_fn(f"maze2d-{maze}")
    batch = np.stack([obs, obs * np.nan])
    np.testing.assert_array_equal(done(batch), [False, True])


def test_reset_is_d4rls_distribution_and_seeded():
    env = make_env("maze2d-medium")
    starts = np.stack([env.reset(seed=s)[0] for s in range(300)])
    cells = np.rint(starts[:, :2])
    assert np.abs(starts[:, :2] - cells).max() <= 0.1
    free = {tuple(c) for c in MAZES["medium"].free_cells}
    assert {tuple(c) for c in cells.astype(int)} == free  # every free cell, goal included
    assert 0.07 < starts[:, 2:].std() < 0.13
    np.testing.assert_array_equal(env.reset(seed=7)[0], starts[7])


# ---- the waypoint controller and generated data ----------------------------------------------

def test_controller_reaches_every_umaze_cell_from_every_other():
    maze = MAZES["umaze"]
    env, rng = Maze2dEnv("umaze"), np.random.default_rng(0)
    cells = maze.free_cells
    failed = []
    for start in cells:
        for goal in cells:
            if (start == goal).all():
                continue
            controller = WaypointController(maze, rng)
            env.set_state(start + rng.uniform(-0.1, 0.1, 2), rng.normal(0, 0.1, 2))
            obs = env._get_obs()
            for _ in range(maze.max_episode_steps):
                action, reached = controller.get_action(obs[:2], obs[2:], goal.astype(float))
                if reached:
                    break
                obs = env.step(action)[0]
            if not reached or np.linalg.norm(obs[:2] - goal) >= 0.1:
                failed.append((tuple(start), tuple(goal)))
    assert not failed, failed


def test_controller_plans_d4rls_grid_path():
    """umaze from (3, 1) to the goal (1, 1): right along row 3, up column 3, left along row 1
    (D4RL's grid x is the row): waypoints are the cells minus U(0, 0.2), the goal exact."""
    controller = WaypointController(MAZES["umaze"], np.random.default_rng(0))
    controller.get_action([3.0, 1.0], [0.0, 0.0], [1.02, 0.97])
    cells = np.array([[3, 2], [3, 3], [2, 3], [1, 3], [1, 2], [1, 1]])
    got = np.array(controller._waypoints)
    assert got.shape == cells.shape
    offsets = cells - got
    assert (offsets[:-1] >= 0).all() and (offsets[:-1] <= 0.2).all() and (offsets[-1] == 0).all()
    # Two shortest paths from (1, 1) to (2, 2) in medium: D4RL's argmax takes the first best
    # action in the order NOOP, UP (col - 1), DOWN (col + 1), LEFT (row - 1), RIGHT (row + 1).
    controller = WaypointController(MAZES["medium"], np.random.default_rng(0))
    controller.get_action([1.0, 1.0], [0.0, 0.0], [2.0, 2.0])
    np.testing.assert_array_equal(np.ceil(np.array(controller._waypoints)), [[1, 2], [2, 2]])


@pytest.fixture(scope="module")
def generated():
    return maze2d_dataset("maze2d-umaze", 2000, seed=3)


def test_generated_data_follows_d4rls_recipe(generated):
    d = generated
    assert isinstance(d, Dataset) and d.name == "maze2d-umaze" and len(d) == 2000
    assert not d.terminals.any()
    # One continuing stream: no reset anywhere, timeouts only split it.
    np.testing.assert_array_equal(d.next_observations[:-1], d.observations[1:])
    ends = np.flatnonzero(d.timeouts)
    assert np.diff(np.concatenate([[-1], ends])).max() <= STEPS["umaze"] + 1
    assert len(ends) > 10  # goals reached: umaze goals take < 300 steps
    # Rewards of each row's observation w.r.t. the fixed goal (D4RL's relabelling).
    want = np.linalg.norm(d.observations[:, :2] - MAZES["umaze"].goal, axis=1) <= 0.5
    np.testing.assert_array_equal(d.rewards, want.astype(np.float32))
    assert 0 < d.rewards.sum() < len(d)
    np.testing.assert_allclose(np.hstack([d.qpos, d.qvel]), d.observations, atol=1e-5)
    assert np.abs(d.actions).max() <= 1.0
    again = maze2d_dataset("maze2d-umaze", 2000, seed=3)
    np.testing.assert_array_equal(again.actions, d.actions)
    dense = maze2d_dataset("maze2d-umaze-dense", 50, seed=3)
    np.testing.assert_allclose(dense.rewards, np.exp(-np.linalg.norm(
        dense.observations[:, :2] - MAZES["umaze"].goal, axis=1)), rtol=1e-6)


def test_generated_data_round_trips_and_replays_in_its_model(generated, tmp_path):
    report = consistency.check(generated, models=task_spec("maze2d-umaze").models)
    assert report["status"] == "matches" and report["sim_model"] == "PointMaze_UMaze-v3"
    assert report["residual"] < 1e-5 and report["rows_used"] > 1900
    path = write_hdf5(generated, tmp_path / "maze2d-umaze.hdf5", **consistency.attrs(report))
    back = read_hdf5(path)
    assert back.name == "maze2d-umaze" and back.extra["sim_model"] == "PointMaze_UMaze-v3"
    for key in ("observations", "actions", "rewards", "next_observations", "terminals",
                "timeouts", "qpos", "qvel"):
        np.testing.assert_array_equal(getattr(back, key), getattr(generated, key), err_msg=key)
    # The replay can fail: the same data with the action axes swapped (a coordinate mix-up).
    swapped = back.subset(np.arange(len(back)))
    swapped.actions = swapped.actions[:, ::-1].copy()
    with pytest.raises(consistency.ConsistencyError, match="PointMaze_UMaze-v3"):
        consistency.check(swapped)
