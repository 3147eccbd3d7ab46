"""Maze2d data from D4RL's hdf5 layout (no next_observations) and from Minari's PointMaze
episodes, into the harness's D4RL-frame Dataset that replays in its simulator."""
from __future__ import annotations

from types import SimpleNamespace

import gymnasium as gym
import h5py
import numpy as np
import pytest

from harness import maze2d, plan
from harness.data import consistency
from harness.data.d4rl import read_hdf5
from harness.data.sources import d4rl_style_name, is_minari_id, pointmaze_to_dataset


def test_source_names_for_maze2d():
    cfg = {"tasks": ["maze2d-umaze", "maze2d-large-dense"], "data": {"source": "d4rl"}}
    assert plan.source_name(cfg, "maze2d-umaze") == "maze2d-umaze-v1"
    assert plan.source_name(cfg, "maze2d-large-dense") == "maze2d-large-dense-v1"
    cfg["data"]["source"] = "minari"
    assert plan.source_name(cfg, "maze2d-umaze") == "D4RL/pointmaze/umaze-v2"
    assert plan.source_name(cfg, "maze2d-large-dense") == "D4RL/pointmaze/large-dense-v2"
    assert is_minari_id("D4RL/pointmaze/umaze-dense-v2")
    assert d4rl_style_name("D4RL/pointmaze/umaze-dense-v2") == "maze2d-umaze-dense"
    assert d4rl_style_name("maze2d-medium-v1") == "maze2d-medium"
    assert plan.split_task("maze2d-medium-dense") == ("maze2d", "medium-dense")


def test_d4rl_maze2d_file_without_next_observations(tmp_path):
    """D4RL's maze2d files store the stream only; transitions are made as qlearning_dataset
    makes them: next = obs[t + 1], timeout rows (and the last row) dropped."""
    obs = np.arange(10, dtype=np.float32)[:, None].repeat(4, 1)
    timeouts = np.zeros(10, bool)
    timeouts[[3, 7]] = True
    path = tmp_path / "maze2d-umaze-v1.hdf5"
    with h5py.File(path, "w") as f:
        f["observations"] = obs
        f["actions"] = np.zeros((10, 2), np.float32)
        f["rewards"] = np.arange(10, dtype=np.float32)
        f["terminals"] = np.zeros(10, bool)
        f["timeouts"] = timeouts
        f["infos/qpos"] = obs[:, :2].astype(np.float64)
        f["infos/qvel"] = obs[:, 2:].astype(np.float64)
    ds = read_hdf5(path)
    kept = [0, 1, 2, 4, 5, 6, 8]
    np.testing.assert_array_equal(ds.observations[:, 0], kept)
    np.testing.assert_array_equal(ds.next_observations[:, 0], [k + 1 for k in kept])
    np.testing.assert_array_equal(ds.rewards, kept)
    np.testing.assert_array_equal(ds.qpos[:, 0], kept)
    # the row before each cut ends its episode, so no window reads across it
    np.testing.assert_array_equal(np.flatnonzero(ds.timeouts), [2, 5, 6])
    assert "derived" in ds.extra["next_observations"]


def _pointmaze_episode(steps: int = 150, seed: int = 0):
    """One episode recorded in gymnasium-robotics' own PointMaze_UMaze-v3, as Minari's
    D4RL/pointmaze datasets were: dict observations in PointMaze's frame."""
    import gymnasium_robotics
    gym.register_envs(gymnasium_robotics)
    env = gym.make("PointMaze_UMaze-v3", continuing_task=True, max_episode_steps=steps)
    first, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    obs, actions = [first["observation"]], []
    for _ in range(steps):
        a = rng.uniform(-1, 1, 2)
        o, *_ = env.step(a)
        obs.append(o["observation"])
        actions.append(a)
    env.close()
    truncations = np.zeros(steps, bool)
    truncations[-1] = True
    return SimpleNamespace(id=0, observations={"observation": np.array(obs)},
                           actions=np.array(actions), rewards=np.zeros(steps),
                           terminations=np.zeros(steps, bool), truncations=truncations)


def test_minari_pointmaze_episodes_replay_in_the_d4rl_frame():
    episodes = [_pointmaze_episode(seed=s) for s in (0, 1)]
    minari_ds = SimpleNamespace(iterate_episodes=lambda: iter(episodes))
    ds = pointmaze_to_dataset(minari_ds, "maze2d-umaze", source="minari:D4RL/pointmaze/umaze-v2")
    assert len(ds) == 300 and ds.obs_dim == 4 and ds.act_dim == 2
    assert ds.timeouts.sum() == 2 and not ds.terminals.any()
    # rewards against the fixed evaluation goal, from each row's observation (D4RL's relabel)
    maze, _ = maze2d.parse_task("maze2d-umaze")
    dist = np.linalg.norm(ds.observations[:, :2] - maze.goal, axis=1)
    np.testing.assert_array_equal(ds.rewards, (dist <= 0.5).astype(np.float32))
    # the converted rows are transitions of the harness's simulator: the replay passes
    report = consistency.check(ds, consistency.ConsistencyConfig(rows=200))
    assert report["status"] == "matches" and report["rows_used"] > 100, report
    assert report["residual"] < 1e-4, report


def test_minari_pointmaze_needs_dict_observations():
    ep = SimpleNamespace(id=3, observations=np.zeros((3, 4)), actions=np.zeros((2, 2)),
                         rewards=np.zeros(2), terminations=np.zeros(2, bool),
                         truncations=np.ones(2, bool))
    with pytest.raises(ValueError, match="episode 3 has ndarray"):
        pointmaze_to_dataset(SimpleNamespace(iterate_episodes=lambda: iter([ep])),
                             "maze2d-umaze", source="minari:x")


def test_rollout_error_simulator_steps_maze_states_in_the_d4rl_frame():
    """The study's simulator chains steps through (qpos, qvel) as datasets store them: its
    multi-step rollout equals stepping one env straight through."""
    from analysis.rollout_error import SimulatorModel, states_from_observations
    from harness.envs import make_env
    obs = np.array([[1.0, 2.0, 0.5, -0.5]])
    qpos, qvel = states_from_observations(obs, nq=2, nv=2)
    np.testing.assert_array_equal(qpos, [[1.0, 2.0]])
    np.testing.assert_array_equal(qvel, [[0.5, -0.5]])
    actions = np.random.default_rng(0).uniform(-1, 1, (1, 20, 2))
    sim = SimulatorModel("maze2d-umaze")
    start = np.array([[1.0, 1.0, 0.0, 0.0]], np.float32)
    out = sim.simulate(*sim.states_for(start), actions=actions)
    env = make_env("maze2d-umaze")
    env.reset(seed=0)
    env.unwrapped.set_state(start[0, :2].astype(np.float64), start[0, 2:].astype(np.float64))
    straight = np.stack([env.step(a)[0] for a in actions[0]])
    np.testing.assert_allclose(out["next_obs"][0], straight, atol=1e-9)
