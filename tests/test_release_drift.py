"""D4RL-layout files recorded in an older MuJoCo release (2.3.7; tests/data/mujoco-2.3.7,
made by scripts/measure_release_drift.py --test-data, README there) imported through the real
import step: each with the verdict its family's measured release drift gives
(docs/physics-drift.md); a deliberately wrong model is still refused."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import pytest

from harness import plan
from harness.config import ConfigError
from harness.data import consistency
from harness.data.consistency import (ACCEPTED, DRIFT, MATCHES, WRONG, ConsistencyConfig,
                                      ConsistencyError, check, verdict)
from harness.data.d4rl import stored_recording_release
from harness.data.sources import import_step, load_dataset

DATA = Path(__file__).parent / "data" / "mujoco-2.3.7"
SMOKE = "config/smoke.yaml"


def _import(name: str, task: str, tmp_path, **consistency_cfg) -> tuple[dict, dict]:
    out = tmp_path / f"{task}.hdf5"
    result = import_step({"task": task, "out": str(out),
                          "config": {"name": str(DATA / name), "consistency": consistency_cfg}})
    with h5py.File(out, "r") as f:
        attrs = dict(f.attrs)
    return result, attrs


@pytest.mark.parametrize("name, task, model, status", [
    # hopper's contacts moved between 2.3.7 and 4.0 (residual ~0.15, median ~8e-3)
    ("hopper-random.hdf5", "hopper-random", "hopper.xml", DRIFT),
    # walker2d and halfcheetah replay as today's own data would (float32 states)
    ("walker2d-random-walker2d.hdf5", "walker2d-random", "walker2d.xml", MATCHES),
    ("walker2d-random-walker2d_v5.hdf5", "walker2d-random", "walker2d_v5.xml", MATCHES),
    ("halfcheetah-random.hdf5", "halfcheetah-random", "half_cheetah.xml", MATCHES),
])
def test_older_release_files_get_their_verdict(name, task, model, status, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        result, attrs = _import(name, task, tmp_path, rows=600)
    assert {k: result["tags"][k] for k in ("sim_model", "consistency_status",
                                           "recorded_mujoco", "data.verdict")} == \
        {"sim_model": model, "consistency_status": status, "recorded_mujoco": "2.3.7",
         "data.verdict": status}
    assert attrs["sim_model"] == model and attrs["consistency_status"] == status
    assert attrs["recorded_mujoco"] == "2.3.7"  # from the recorder's mujoco_version attr
    assert stored_recording_release(tmp_path / f"{task}.hdf5") == "2.3.7"
    report = json.loads(attrs["consistency"])
    assert report["recorded_mujoco"] == "2.3.7" and report["status"] == status
    if status == DRIFT:
        assert "up to MuJoCo release drift" in caplog.text and "2.3.7" in caplog.text
        bound = ConsistencyConfig().release_drift["hopper"]
        assert ConsistencyConfig.tolerance < result["consistency_residual"] < bound.residual
    else:
        assert result["consistency_residual"] < 1e-4
    others = [m for m in report["residuals"] if m != model]
    assert all(report["residuals"][m]["residual"] > 1.0 for m in others)  # the other foot


def test_a_wrong_model_from_an_older_release_is_still_refused(tmp_path):
    with pytest.raises(ConsistencyError) as err:
        _import("hopper-random-wrong-foot-friction.hdf5", "hopper-random", tmp_path, rows=600)
    message = str(err.value)
    assert "\n" not in message and "wrong simulator model" in message
    assert "data.consistency.accept_mismatch: true" in message
    assert "recorded in MuJoCo 2.3.7" in message and "release_drift.hopper" in message
    result, attrs = _import("hopper-random-wrong-foot-friction.hdf5", "hopper-random",
                            tmp_path, rows=600, accept_mismatch=True)
    assert attrs["consistency_status"] == ACCEPTED and result["consistency_residual"] > 0.4


def test_walker2d_data_is_refused_in_the_other_foot_model():
    data = load_dataset(str(DATA / "walker2d-random-walker2d.hdf5"))
    with pytest.raises(ConsistencyError, match=r"walker2d_v5\.xml 1\.\d"):
        check(data, ConsistencyConfig(rows=600), models=("walker2d_v5.xml",))


def test_models_too_close_under_drift_are_not_told_apart():
    cfg = ConsistencyConfig()
    stats = {"walker2d_v5.xml": {"residual": 0.15, "median": 1e-3},
             "walker2d.xml": {"residual": 0.1, "median": 1e-3}}
    outcome, best, reason = verdict(stats, "walker2d", cfg)
    assert (outcome, best) == (WRONG, "walker2d.xml") and "model_ratio=4x" in reason
    stats["walker2d_v5.xml"]["residual"] = 1.5
    assert verdict(stats, "walker2d", cfg)[:2] == (DRIFT, "walker2d.xml")
    stats["walker2d.xml"] = {"residual": 1e-5, "median": 1e-7}
    assert verdict(stats, "walker2d", cfg)[:2] == (MATCHES, "walker2d.xml")
    # the median bound: a maze mismatch every row shows (damping x1.1), tail within bounds
    maze = {"PointMaze_UMaze-v3": {"residual": 1.2e-3, "median": 3e-4}}
    assert verdict(maze, "maze2d", cfg)[0] == WRONG


def test_the_recording_release_from_the_config_when_the_file_has_none(tmp_path):
    src = tmp_path / "hopper-random-v2.hdf5"
    src.write_bytes((DATA / "hopper-random.hdf5").read_bytes())
    with h5py.File(src, "a") as f:
        del f.attrs["mujoco_version"]
    data = load_dataset(str(src))
    assert check(data, ConsistencyConfig(rows=300))["recorded_mujoco"] == "unknown"
    report = check(data, ConsistencyConfig(rows=300, recorded_with="2.0 (mujoco-py)"))
    assert report["recorded_mujoco"] == "2.0 (mujoco-py)"
    assert consistency.attrs(report)["recorded_mujoco"] == "2.0 (mujoco-py)"


@pytest.mark.parametrize("bad, line", [
    ({"release_drift": {"ant": {"residual": 1, "median": 1}}},
     "data.consistency.release_drift.ant: unknown task family"),
    ({"release_drift": {"hopper": {"residual": 1e-3, "median": 1e-2}}},
     "data.consistency.release_drift.hopper.residual: must be >= tolerance (0.01), got 0.001"),
    ({"release_drift": {"hopper": {"residual": 0.5}}}, "data.consistency.release_drift.hopper:"),
    ({"model_ratio": 0.5}, "data.consistency.model_ratio: must be >= 1, got 0.5"),
    ({"recorded_with": 2.0}, "data.consistency.recorded_with: expected a string, got 2.0"),
])
def test_new_keys_are_validated_in_one_line(bad, line):
    with pytest.raises(ConfigError) as err:
        plan.load_config(SMOKE, {"data": {"source": "d4rl", "consistency": bad}})
    assert line in str(err.value) and "\n" not in str(err.value)


def test_a_partial_release_drift_keeps_the_other_families():
    cfg = plan.load_config(SMOKE, {"data": {"source": "d4rl", "consistency": {
        "release_drift": {"hopper": {"residual": 0.5, "median": 0.05}}}}})
    job = plan.import_job(cfg, cfg["tasks"][0])
    drift = job["config"]["consistency"]["release_drift"]
    assert drift["hopper"] == {"residual": 0.5, "median": 0.05}
    assert drift["walker2d"] == {"residual": 0.2, "median": 0.02}


def test_data_recorded_in_todays_release_gets_no_drift_allowance():
    """hopper's drift band would also hide a 10 % heavier torso (docs/physics-drift.md); data
    that says it was recorded in the release replaying it is judged without the band."""
    data = load_dataset(str(DATA / "hopper-random.hdf5"))
    with pytest.raises(ConsistencyError, match="no release drift to allow for"):
        check(data, ConsistencyConfig(rows=300, recorded_with=consistency.mujoco_version()))


def test_the_evaluation_records_the_datasets_release(tmp_path):
    """eval.json says which MuJoCo release the training data was recorded in (the imported
    file's attrs): what the tables' and summary's evaluation-physics sentence reads."""
    import pandas as pd

    from harness.training.evaluation import evaluate_step
    from harness.training.policy import PolicyConfig, make_agent, save_policy
    _import("hopper-random.hdf5", "hopper-random", tmp_path, rows=200)
    dataset = load_dataset(str(tmp_path / "hopper-random.hdf5"))
    pdir = tmp_path / "policy"
    pdir.mkdir()
    save_policy(make_agent("td3bc", dataset, PolicyConfig()), "td3bc", pdir / "policy.pt")
    (pdir / "final.json").write_text(json.dumps({"steps": 1, "wall_time_s": 0.0,
                                                 "config_hash": "x"}))
    pd.DataFrame({"step": [1], "normalized_score": [1.0]}).to_parquet(
            pdir / "metrics.parquet")
    out = evaluate_step({"policy_dir": str(pdir), "dataset": str(tmp_path / "hopper-random.hdf5"),
                         "task": "hopper-random", "seed": 0, "out": str(tmp_path / "eval.json"),
                         "config": {"episodes": 1, "seed": 0}})
    assert out["dataset_mujoco"] == "2.3.7" and out["sim_model"] == "hopper.xml"
    assert json.loads((tmp_path / "eval.json").read_text())["dataset_mujoco"] == "2.3.7"
