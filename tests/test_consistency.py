"""Dynamics-consistency check at import: the simulator model whose replay matches the data.

Small walker2d files are recorded in each of the task's two models (Walker2d-v5's
walker2d_v5.xml, both feet friction 1.9; and walker2d.xml, the v2-v4 model D4RL recorded
with, right foot 0.9) and imported through the real import step.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from datagen.generate import collect
from harness import plan
from harness.config import ConfigError, from_dict
from harness.data import consistency, record
from harness.data.consistency import ConsistencyConfig, ConsistencyError, check
from harness.data.d4rl import read_hdf5, stored_sim_model, write_hdf5
from harness.data.dataset import Dataset
from harness.data.sources import import_step
from harness.envs import TASKS, make_env

SMOKE = "config/smoke.yaml"
V5, OLD = TASKS["walker2d"].models  # ("walker2d_v5.xml", "walker2d.xml")


def _record(model: str, n: int = 600, seed: int = 0) -> Dataset:
    """n transitions of a fixed random action sequence in walker2d under `model`."""
    env = make_env("walker2d", seed=seed, model=model)
    actions = iter(np.random.default_rng(seed).uniform(-1, 1, (n, 6)).astype(np.float32))
    try:
        return collect(env, lambda _obs: next(actions), n, name="walker2d-random")
    finally:
        env.close()


@pytest.fixture(scope="module")
def recorded():
    return {model: _record(model) for model in (V5, OLD)}


def test_make_env_builds_each_model_from_gymnasiums_assets():
    friction = {m: make_env("walker2d", model=m).unwrapped.model.geom("foot_geom").friction[0]
                for m in (None, V5, OLD)}
    assert friction == {None: 1.9, V5: 1.9, OLD: 0.9}  # right foot; the left is 1.9 in both
    with pytest.raises(ValueError, match="not one of walker2d's models"):
        make_env("walker2d", model="hopper.xml")


@pytest.mark.parametrize("model", [V5, OLD])
def test_import_chooses_the_recording_model_and_stores_it(recorded, model, tmp_path):
    src, out = tmp_path / "walker2d-random-v2.hdf5", tmp_path / "out" / "walker2d-random.hdf5"
    write_hdf5(recorded[model], src)
    result = import_step({"task": "walker2d-random", "out": str(out),
                          "config": {"name": str(src), "consistency": {}}})
    other = OLD if model == V5 else V5
    # float64 states, float32 next observations: the right model is exact to float32 rounding
    # while the other friction is off by O(1) on right-foot contacts.
    assert result["consistency_residual"] < 1e-5
    assert result[f"consistency_residual/{other}"] > ConsistencyConfig.tolerance
    assert result["tags"] == {"sim_model": model, "consistency_status": "matches",
                              "recorded_mujoco": consistency.mujoco_version(),  # generated
                              "data.origin": "file", "data.source": str(src),
                              "data.verdict": "matches", "data.sim_model": model,
                              "data.sha256": record.file_sha256(src)}
    with h5py.File(out, "r") as f:
        assert f.attrs["sim_model"] == model
        assert f.attrs["consistency_residual"] == result["consistency_residual"]
        report = json.loads(f.attrs["consistency"])
    assert set(report["residuals"]) == {V5, OLD} and report["rows_used"] > 500
    assert stored_sim_model(out) == model and read_hdf5(out).extra["sim_model"] == model


def test_mismatch_stops_with_every_models_residual_and_the_config_key(recorded):
    with pytest.raises(ConsistencyError) as err:
        check(recorded[OLD], models=(V5,))
    message = str(err.value)
    assert "data.consistency.accept_mismatch: true" in message and "\n" not in message
    assert f"{V5} " in message and "wrong simulator model" in message
    # Both models allowed, bounds below float32 rounding: both listed, best named.
    tight = {"walker2d": {"residual": 1e-12, "median": 1e-12}}
    with pytest.raises(ConsistencyError) as err:
        check(recorded[OLD], from_dict(ConsistencyConfig, {
            "tolerance": 1e-12, "median_tolerance": 1e-12, "release_drift": tight}))
    residuals = dict(re.findall(r"(walker2d\S*\.xml) ([-+.e0-9]+) \(", str(err.value)))
    residuals = {m: float(r) for m, r in residuals.items()}
    assert residuals[OLD] < 1e-5 < ConsistencyConfig.tolerance < residuals[V5]
    assert f"(evaluated in {OLD})" in str(err.value)


def test_accepted_mismatch_keeps_the_best_model(recorded):
    tight = {"walker2d": {"residual": 1e-12, "median": 1e-12}}
    report = check(recorded[V5], from_dict(ConsistencyConfig, {
        "tolerance": 1e-12, "median_tolerance": 1e-12, "release_drift": tight,
        "accept_mismatch": True}))
    assert report["status"] == "wrong model accepted" and report["sim_model"] == V5
    assert report["residual"] == report["residuals"][V5]["residual"] > 1e-12


def test_without_states_it_warns_and_uses_the_default_model(recorded, caplog):
    d = recorded[OLD]
    no_states = Dataset(d.observations, d.actions, d.rewards, d.next_observations,
                        d.terminals, d.timeouts, name=d.name)
    with caplog.at_level(logging.WARNING):
        report = check(no_states)
    assert report["status"] == "not checked (no qpos/qvel)" and report["sim_model"] == V5
    assert "no qpos/qvel" in caplog.text
    assert consistency.attrs(report)["consistency_status"] == "not checked (no qpos/qvel)"


def _with_states(d: Dataset, qpos, qvel) -> Dataset:
    return Dataset(d.observations, d.actions, d.rewards, d.next_observations, d.terminals,
                   d.timeouts, name=d.name, qpos=qpos, qvel=qvel)


def test_states_rebuilt_from_clipped_observations_are_left_out(recorded):
    # D4RL's fix_qpos_qvel.py: qpos[1:] and qvel from the (float32, clipped) observation.
    d = recorded[OLD]
    obs = d.observations.astype(np.float64)
    rebuilt = _with_states(d, np.concatenate([d.qpos[:, :1], obs[:, :8]], 1), obs[:, 8:])
    report = check(rebuilt)
    on_bound = int((np.abs(obs[:, 8:]) == 10.0).any(-1).sum())
    assert 0 < report["left_out"]["qvel_on_clip_bound"] <= on_bound
    assert report["status"] == "matches" and report["sim_model"] == OLD
    assert report["residuals"][V5]["residual"] > ConsistencyConfig.tolerance


def test_states_that_do_not_match_the_observations_count_against_every_model(recorded):
    # States shifted by one row: none gives its row's observation. That is evidence against
    # each candidate (the mismatch is the row's error), never a reason to skip the check.
    d = recorded[OLD]
    shifted = _with_states(d, np.roll(d.qpos, 1, axis=0), np.roll(d.qvel, 1, axis=0))
    with pytest.raises(ConsistencyError) as err:
        check(shifted)
    message = str(err.value)
    assert "\n" not in message and "no candidate explains the data" in message
    used = len(consistency.sample_rows(d, 2000, 0))
    for model in (V5, OLD):  # each candidate's figures, with its observation mismatch count
        assert re.search(rf"{re.escape(model)} [.e0-9]+ \(median [.e0-9]+; its stored states "
                         rf"give another observation in \d+ of {used} rows\)", message)
    report = check(shifted, from_dict(ConsistencyConfig, {"accept_mismatch": True}))
    assert report["status"] == consistency.ACCEPTED
    assert report["residuals"][OLD]["state_mismatch"] > used // 2


def test_config_key_is_validated_and_reaches_the_import_job(tmp_path):
    cfg = plan.load_config(SMOKE, {"data": {"source": "d4rl", "consistency": {"rows": 500}},
                                   "results_dir": str(tmp_path)})
    job = plan.import_job(cfg, cfg["tasks"][0])
    assert job["config"]["consistency"] == {**asdict(ConsistencyConfig()), "rows": 500}
    # The evaluation reads the model from the dataset the import wrote.
    assert plan.eval_job(cfg, cfg["methods"][0], cfg["tasks"][0], 0)["dataset"] == job["out"]
    with pytest.raises(ConfigError, match=r"data\.consistency.*tolerance: must be positive"):
        plan.load_config(SMOKE, {"data": {"source": "d4rl", "consistency": {"tolerance": 0}}})
    with pytest.raises(ConfigError, match=r"data\.consistency.*unknown"):
        plan.load_config(SMOKE, {"data": {"consistency": {"tol": 1}}})


class _Fixed(torch.nn.Module):
    """A parameter-free policy: the same action in every state."""
    def act(self, obs, deterministic=True):
        return torch.full((len(obs), 6), 0.5)


def test_evaluation_runs_in_the_recorded_model():
    from harness.training.evaluation import evaluate
    returns = {m: evaluate(_Fixed(), "walker2d-random", 1, seed=0, model=m)["return_mean"]
               for m in (None, V5, OLD)}
    assert returns[None] == returns[V5] != returns[OLD]


def test_d4rl_import_job_records_the_model_in_the_file_and_mlflow(recorded, tmp_path,
                                                                   monkeypatch):
    """plan -> runner -> import step, as the DAG runs it: the older-model file is imported with
    walker2d.xml, which the evaluation spec's dataset carries and MLflow shows."""
    mlflow = pytest.importorskip("mlflow")
    from harness import tracking
    from harness.runner import run_job
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DYDIFF_MLFLOW", "1")
    write_hdf5(recorded[OLD], tmp_path / "d4rl" / "walker2d-random-v2.hdf5")
    cfg = plan.load_config(SMOKE, {"data": {"source": "d4rl"}, "results_dir": str(tmp_path),
                                   "tasks": ["walker2d-random"]})
    uri = tracking.init_experiment(cfg)
    job = plan.import_job(cfg, "walker2d-random")
    result = run_job(plan.with_context(cfg, job))
    assert stored_sim_model(plan.eval_job(cfg, "td3bc", "walker2d-random", 0)["dataset"]) == OLD
    run = mlflow.tracking.MlflowClient(uri).get_run(
        Path(job["out"]).with_suffix(".mlflow_run_id").read_text())
    assert run.data.tags["sim_model"] == OLD and run.data.tags["consistency_status"] == "matches"
    assert run.data.metrics["final/consistency_residual"] == result["consistency_residual"]
    assert run.data.metrics[f"final/consistency_residual/{V5}"] > ConsistencyConfig.tolerance
