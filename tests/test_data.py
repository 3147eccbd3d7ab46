"""Dataset sources (D4RL hdf5 path / name, Minari, generated), episodes, and every bad input."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from harness.config import ConfigError, from_dict
from harness.data.d4rl import read_hdf5, write_hdf5
from harness.data.dataset import Dataset, DatasetError
from datagen.generate import GenerateConfig, OnlineSAC, generate_datasets, random_dataset
from harness.data.sources import load_dataset
from harness.envs import TASKS, make_env


def _arrays(n=10, obs_dim=11, act_dim=3):
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(n + 1, obs_dim)).astype(np.float32)
    return {"observations": obs[:-1].copy(), "next_observations": obs[1:].copy(),
            "actions": rng.uniform(-1, 1, (n, act_dim)).astype(np.float32),
            "rewards": rng.normal(size=n).astype(np.float32),
            "terminals": np.zeros(n, bool), "timeouts": np.eye(1, n, n - 1, dtype=bool)[0]}


def _write_raw(path, arrays, **attrs):
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v)
        for k, v in attrs.items():
            f.attrs[k] = v
    return path


# ---- random_dataset -----------------------------------------------------------------------

def test_random_dataset_layout(hopper_random):
    d = hopper_random
    assert d.name == "hopper-random" and len(d) == 3000
    assert d.observations.shape == (3000, 11) and d.observations.dtype == np.float32
    assert d.actions.shape == (3000, 3) and np.abs(d.actions).max() <= 1.0
    assert d.qpos.shape == (3000, 6) and d.qvel.shape == (3000, 6)
    assert d.terminals.dtype == bool and d.terminals.sum() > 50
    assert not (d.terminals & d.timeouts).any()
    # Within an episode each row continues the previous one.
    cont = ~(d.terminals | d.timeouts)[:-1]
    np.testing.assert_array_equal(d.next_observations[:-1][cont], d.observations[1:][cont])
    # D4RL's hopper-random scores about 1.2 (normalised).
    assert 0 < d.normalized_returns().mean() < 5


def test_random_dataset_is_deterministic_and_seed_dependent():
    a, b = random_dataset("hopper", 300, seed=5), random_dataset("hopper", 300, seed=5)
    c = random_dataset("hopper", 300, seed=6)
    for key in ("observations", "actions", "rewards", "qpos", "terminals"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    assert not np.array_equal(a.actions, c.actions)


def test_random_dataset_timeouts_on_truncation():
    d = random_dataset("halfcheetah", 2100, seed=0)  # never terminates: 1000-step episodes
    assert not d.terminals.any()
    np.testing.assert_array_equal(np.flatnonzero(d.timeouts), [999, 1999, 2099])
    assert [s.stop - s.start for s in d.episodes()] == [1000, 1000, 100]


# ---- episodes() ---------------------------------------------------------------------------

def test_episodes_split_on_terminals_timeouts_and_gaps():
    a = _arrays(10)
    a["terminals"][2] = True          # episode 0: rows 0-2
    a["timeouts"][5] = True           # episode 1: rows 3-5
    a["next_observations"][7] += 1.0  # unflagged break: episode 2: rows 6-7
    d = Dataset(name="hopper-x", **a)  # episode 3: rows 8-9 (timeout at the end)
    assert d.episodes() == [slice(0, 3), slice(3, 6), slice(6, 8), slice(8, 10)]
    np.testing.assert_allclose(d.episode_returns(),
                               [a["rewards"][s].sum() for s in d.episodes()], rtol=1e-6)
    # Only episodes that end in a terminal or timeout count as complete.
    assert len(d.normalized_returns()) == 3


# ---- D4RL hdf5 ----------------------------------------------------------------------------

def test_load_hdf5_path_roundtrip(tmp_path, hopper_random):
    path = write_hdf5(hopper_random, tmp_path / "anything.hdf5")
    d = load_dataset(str(path))
    assert d.name == "hopper-random" and d.source == str(path)
    for key in ("observations", "actions", "rewards", "next_observations", "terminals",
                "timeouts", "qpos", "qvel"):
        np.testing.assert_array_equal(getattr(d, key), getattr(hopper_random, key))


def test_load_d4rl_name_from_dataset_dir(tmp_path, monkeypatch):
    # A D4RL download: no 'name' attr, float terminals, rewards (N,), no infos.
    a = _arrays(10)
    a["terminals"] = a["terminals"].astype(np.float32)
    _write_raw(tmp_path / "hopper-medium-replay-v2.hdf5", a)
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    for spec in ("hopper-medium-replay-v2", "hopper-medium-replay"):
        d = load_dataset(spec)
        assert d.name == "hopper-medium-replay" and len(d) == 10 and not d.has_states
        assert d.terminals.dtype == bool
    # By path too: the name comes from the file name, without the version.
    assert load_dataset(str(tmp_path / "hopper-medium-replay-v2.hdf5")).name == \
        "hopper-medium-replay"


def test_missing_d4rl_name_says_where_it_looked_and_how_to_get_data(tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    with pytest.raises(DatasetError) as err:
        load_dataset("walker2d-medium-v2")
    msg = str(err.value)
    assert str(tmp_path / "walker2d-medium-v2.hdf5") in msg
    assert "D4RL_DATASET_DIR" in msg and "Minari" in msg and "generate-datasets" in msg


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DatasetError, match="no dataset file at .*nope.hdf5"):
        load_dataset(str(tmp_path / "nope.hdf5"))


@pytest.mark.parametrize("spec", ["ant-medium-v2", "mujoco/ant/medium-v0"])
def test_unknown_task_lists_known_families(spec):
    with pytest.raises(DatasetError) as err:
        load_dataset(spec)
    assert "ant" in str(err.value) and all(f in str(err.value) for f in TASKS)


def test_missing_key(tmp_path):
    a = _arrays()
    del a["rewards"]
    path = _write_raw(tmp_path / "hopper-medium-v2.hdf5", a)
    with pytest.raises(DatasetError, match="missing key 'rewards'") as err:
        load_dataset(str(path))
    assert str(path) in str(err.value)


def test_mismatched_lengths(tmp_path):
    a = _arrays()
    a["actions"] = a["actions"][:7]
    path = _write_raw(tmp_path / "hopper-medium-v2.hdf5", a)
    with pytest.raises(DatasetError, match="'actions' has 7 rows but 'observations' has 10"):
        load_dataset(str(path))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf(tmp_path, bad):
    a = _arrays()
    a["observations"][4, 2] = bad
    path = _write_raw(tmp_path / "hopper-medium-v2.hdf5", a)
    with pytest.raises(DatasetError, match=r"'observations' has 1 NaN/inf value\(s\), first at "
                                           r"row 4"):
        load_dataset(str(path))


def test_wrong_dtype(tmp_path):
    a = _arrays()
    a["terminals"] = np.full(10, 0.5, np.float32)
    a["actions"] = np.array([[b"x"] * 3] * 10)
    path = _write_raw(tmp_path / "hopper-medium-v2.hdf5", a)
    with pytest.raises(DatasetError) as err:
        load_dataset(str(path))
    assert "'terminals' must be boolean" in str(err.value)
    assert "'actions' must be numeric" in str(err.value)


def test_wrong_observation_width_for_task(tmp_path):
    path = _write_raw(tmp_path / "walker2d-medium-v2.hdf5", _arrays(obs_dim=11, act_dim=3))
    with pytest.raises(DatasetError, match=r"widths \(11, 3\) but Walker2d-v5 has \(17, 6\)"):
        load_dataset(str(path))


def test_not_hdf5(tmp_path):
    path = tmp_path / "hopper-medium-v2.hdf5"
    path.write_text("not an hdf5 file")
    with pytest.raises(DatasetError, match="not a readable hdf5 file"):
        load_dataset(str(path))


# ---- Minari -------------------------------------------------------------------------------

def _make_minari(dataset_id, episodes=3, max_len=40, seed=0):
    """A tiny Minari dataset recorded in Hopper-v5 with the simulator state in the infos.

    minari.DataCollector needs jax (minari[create]); create_dataset_from_buffers writes the
    same storage format from plain episode buffers without it.
    """
    import minari
    from minari.data_collector import EpisodeBuffer

    env = make_env("hopper", seed=seed)
    state = lambda: (env.unwrapped.data.qpos.copy(), env.unwrapped.data.qvel.copy())  # noqa
    buffers, record = [], []
    for ep in range(episodes):
        obs = [env.reset()[0]]
        qpos, qvel = map(list, zip(state()))
        acts, rews, terms, truncs = [], [], [], []
        for t in range(max_len):
            a = env.action_space.sample()
            o, r, term, trunc, _ = env.step(a)
            obs.append(o), acts.append(a), rews.append(r), terms.append(term)
            truncs.append(trunc or (t == max_len - 1 and not term))
            q, v = state()
            qpos.append(q), qvel.append(v)
            if term:
                break
        buffers.append(EpisodeBuffer(id=ep, observations=np.array(obs), actions=np.array(acts),
                                     rewards=rews, terminations=terms, truncations=truncs,
                                     infos={"qpos": np.array(qpos), "qvel": np.array(qvel)}))
        record.append((np.array(obs), np.array(acts), terms, truncs, np.array(qpos)))
    minari.create_dataset_from_buffers(dataset_id, buffers, env=env, algorithm_name="random",
                                       ref_min_score=TASKS["hopper"].ref_min_score,
                                       ref_max_score=TASKS["hopper"].ref_max_score)
    return record


def test_minari_dataset_flattens_to_d4rl_arrays(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    record = _make_minari("mujoco/hopper/tiny-v0")
    monkeypatch.delenv("MINARI_DATASETS_PATH")  # minari_root alone must find it
    d = load_dataset("mujoco/hopper/tiny-v0", minari_root=tmp_path / "minari")
    assert d.name == "hopper-tiny" and d.has_states
    assert len(d) == sum(len(r[1]) for r in record)
    np.testing.assert_allclose(d.observations, np.concatenate([r[0][:-1] for r in record]))
    np.testing.assert_allclose(d.next_observations, np.concatenate([r[0][1:] for r in record]))
    np.testing.assert_array_equal(d.terminals, np.concatenate([r[2] for r in record]))
    np.testing.assert_array_equal(d.timeouts, np.concatenate([r[3] for r in record]))
    np.testing.assert_allclose(d.qpos, np.concatenate([r[4][:-1] for r in record]))
    assert [s.stop - s.start for s in d.episodes()] == [len(r[1]) for r in record]
    # The stored state is the state at each observation.
    env = make_env("hopper")
    from harness.envs import restore_state
    np.testing.assert_allclose(restore_state(env, d.qpos[5], d.qvel[5]), d.observations[5],
                               atol=1e-5)


def test_missing_minari_dataset_says_where_it_looked(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_dataset("mujoco/hopper/medium-v0", minari_root=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "mujoco/hopper/medium-v0") in msg and "not installed" in msg
    assert "D4RL_DATASET_DIR" in msg and "generate-datasets" in msg


# ---- generated (online SAC) ---------------------------------------------------------------

TINY = dict(n_transitions=400, sac_steps=600, start_steps=200, update_after=200,
            batch_size=32, eval_every=200, eval_episodes=1, checkpoint_every=150,
            sac={"hidden": [32, 32]})


def test_generate_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="data.generate.start_steps"):
        from_dict(GenerateConfig, {"sac_steps": 10, "start_steps": 20}, where="data.generate")
    with pytest.raises(ConfigError, match="data.generate.medium_target"):
        from_dict(GenerateConfig, {"medium_target": 100.0, "expert_target": 50.0},
                  where="data.generate")
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(GenerateConfig, {"transitions": 5}, where="data.generate")


def test_generate_all_kinds(tmp_path, caplog):
    # Any policy scores above -5 (reached at the first evaluation); nothing reaches 500.
    cfg = from_dict(GenerateConfig, {**TINY, "medium_target": -5.0, "expert_target": 500.0})
    kinds = ["random", "medium", "medium-replay", "expert", "medium-expert"]
    paths = generate_datasets("hopper", kinds, cfg, tmp_path, seed=0, progress=False)
    assert list(paths) == kinds
    data = {k: load_dataset(str(p)) for k, p in paths.items()}
    attrs = {}
    for k, p in paths.items():
        with h5py.File(p) as f:
            attrs[k] = dict(f.attrs)
        assert p.name == f"hopper-{k}.hdf5" and data[k].name == f"hopper-{k}"
        assert data[k].has_states and attrs[k]["seed"] == 0 and attrs[k]["kind"] == k
    assert len(data["random"]) == len(data["medium"]) == len(data["expert"]) == 400
    assert len(data["medium-expert"]) == 800
    # The medium target is reached at the first evaluation (>= start_steps, at an episode
    # end); medium-replay is the SAC buffer up to that snapshot.
    assert attrs["medium"]["target_reached"]
    assert 200 <= len(data["medium-replay"]) == attrs["medium"]["sac_steps"] < 600
    assert attrs["expert"]["sac_steps"] == 600
    # The expert target (500) cannot be reached: best policy so far, a warning, and attrs.
    assert not attrs["expert"]["target_reached"]
    assert "ran out before the expert target" in caplog.text
    assert attrs["expert"]["policy_normalized_score"] >= attrs["medium"][
        "policy_normalized_score"]
    np.testing.assert_array_equal(data["medium-expert"].observations[:400],
                                  data["medium"].observations)
    # medium-replay's first `start_steps` rows are the uniform-random exploration.
    assert np.abs(data["medium-replay"].actions[:200]).max() <= 1.0


def test_generate_rejects_unknown_kind(tmp_path):
    with pytest.raises(ConfigError, match="unknown dataset kind.*'median'"):
        generate_datasets("hopper", ["median"], GenerateConfig(), tmp_path, seed=0)


def test_online_sac_resume_equals_uninterrupted(tmp_path):
    cfg = from_dict(GenerateConfig, {**TINY, "medium_target": 1e3, "expert_target": 2e3})
    full = OnlineSAC("hopper", cfg, seed=3, ckpt_path=tmp_path / "a.pt")
    full.run(need_expert=True, progress=False)
    part = OnlineSAC("hopper", cfg, seed=3, ckpt_path=tmp_path / "b.pt")
    part.run(need_expert=True, progress=False, stop_at=300)
    assert 300 <= part.step < 600
    resumed = OnlineSAC("hopper", cfg, seed=3, ckpt_path=tmp_path / "b.pt")  # fresh object
    assert resumed.step == part.step
    resumed.run(need_expert=True, progress=False)
    assert resumed.step == full.step == 600
    for key in ("observations", "actions", "rewards", "qpos"):
        np.testing.assert_array_equal(resumed.replay.data[key][:600], full.replay.data[key][:600])
    for (k, a), b in zip(full.agent.state_dict().items(), resumed.agent.state_dict().values()):
        assert torch.equal(a, b), k
    assert resumed.evals == full.evals


def test_online_sac_checkpoint_from_other_config_is_rejected(tmp_path):
    cfg = from_dict(GenerateConfig, TINY)
    OnlineSAC("hopper", cfg, seed=0, ckpt_path=tmp_path / "c.pt").save()
    with pytest.raises(ConfigError, match="different SAC seed"):
        OnlineSAC("hopper", cfg, seed=1, ckpt_path=tmp_path / "c.pt")


def test_read_hdf5_keeps_stored_name(tmp_path, hopper_random):
    path = write_hdf5(hopper_random, tmp_path / "x.hdf5")
    assert read_hdf5(path).name == "hopper-random"
