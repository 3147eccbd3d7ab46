"""The import check between a user's files and every published number: files that look right
but are not (tests/bad_data.py, built once per session by the `bad_data` fixture) are refused
with the real cause in one line, or imported with their verdict recorded."""
from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pytest

from bad_data import record, write_d4rl
from harness.data import consistency
from harness.data.consistency import ConsistencyConfig, ConsistencyError
from harness.data.d4rl import V0_TIMEOUTS, read_hdf5, v0_timeouts
from harness.data.dataset import DatasetError
from harness.data.sources import import_step, load_dataset


def record_walker():
    return record("walker2d", n=200, model="walker2d.xml")


def _import(path, task, tmp_path, **consistency_cfg):
    out = tmp_path / "datasets" / f"{task}.hdf5"
    return import_step({"task": task, "out": str(out),
                        "config": {"name": str(path), "consistency": consistency_cfg}}), out


def _figures(message: str) -> dict[str, tuple[float, float, int, int]]:
    """{model: (residual, median, rows whose state gives another observation, rows)}."""
    found = re.findall(r"(\S+\.xml) ([.e0-9+-]+) \(median ([.e0-9+-]+); its stored states give "
                       r"another observation in (\d+) of (\d+) rows\)", message)
    return {m: (float(r), float(md), int(k), int(n)) for m, r, md, k, n in found}


def test_another_robot_with_equal_widths_is_refused_naming_each_candidate(bad_data, tmp_path,
                                                                           monkeypatch):
    # walker2d data (17 obs, 6 actions, 9 + 9 state) under halfcheetah's D4RL name, found in
    # the D4RL folder by that name as `data.source: d4rl` finds it.
    monkeypatch.setenv("D4RL_DATASET_DIR", str(bad_data["walker2d-as-halfcheetah"].parent))
    with pytest.raises(ConsistencyError) as err:
        _import("halfcheetah-random-v2", "halfcheetah-random", tmp_path)
    message = str(err.value)
    assert "\n" not in message and "halfcheetah-random-v2.hdf5" in message
    assert "no candidate explains the data" in message
    assert "data.consistency.accept_mismatch: true" in message
    figures = _figures(message)
    assert list(figures) == ["half_cheetah.xml"]
    residual, median, mismatched, rows = figures["half_cheetah.xml"]
    bound = ConsistencyConfig().release_drift["halfcheetah"]
    assert residual > 10 * bound.residual and median > bound.median
    assert 0 < mismatched < rows  # some states give their observation: those are replayed


def test_accepting_a_mismatch_is_the_only_way_past_and_is_recorded(bad_data, tmp_path,
                                                                   monkeypatch):
    from harness.data import record as records
    monkeypatch.setenv("D4RL_DATASET_DIR", str(bad_data["walker2d-as-halfcheetah"].parent))
    result, out = _import("halfcheetah-random-v2", "halfcheetah-random", tmp_path,
                          accept_mismatch=True)
    assert result["tags"]["consistency_status"] == consistency.ACCEPTED
    rec = records.read_record(out)  # next to the dataset, and on the run's tags
    assert rec["verdict"] == consistency.ACCEPTED and rec["accept_mismatch"] is True
    assert rec["origin"] == "d4rl" and result["tags"]["data.verdict"] == consistency.ACCEPTED
    assert records.origin_text(rec).startswith("D4RL file halfcheetah-random-v2.hdf5, sha256 ")
    with h5py.File(out, "r") as f:
        assert f.attrs["consistency_status"] == consistency.ACCEPTED
        report = json.loads(f.attrs["consistency"])
    assert report["accept_mismatch"] is True
    assert report["residuals"]["half_cheetah.xml"]["state_mismatch"] > 0


def test_states_that_give_their_observations_only_in_another_model(bad_data, tmp_path):
    # halfcheetah data under walker2d's name: walker2d's observation clips qvel to +-10, so
    # the fast rows' states give another observation in both walker2d models...
    with pytest.raises(ConsistencyError) as err:
        _import(bad_data["halfcheetah-as-walker2d"], "walker2d-random", tmp_path)
    figures = _figures(str(err.value))
    assert set(figures) == {"walker2d_v5.xml", "walker2d.xml"}
    assert all(k > 0 and r > 1.0 for r, _md, k, _n in figures.values())
    # ... and every one of them gives its own observation in half_cheetah.xml, where it replays.
    d = load_dataset(str(bad_data["halfcheetah-as-walker2d"]))
    d.name = "halfcheetah-random"
    report = consistency.check(d)
    assert report["status"] == consistency.MATCHES
    assert report["residuals"]["half_cheetah.xml"]["state_mismatch"] == 0


def test_actions_outside_the_action_space_are_named_before_any_replay(bad_data, tmp_path,
                                                                      monkeypatch):
    def no_physics(*_args, **_kw):
        raise AssertionError("replayed before the input checks")
    monkeypatch.setattr(consistency, "row_errors", no_physics)
    with pytest.raises(DatasetError) as err:
        _import(bad_data["hopper-actions-x3"], "hopper-random", tmp_path)
    message = str(err.value)
    assert "\n" not in message and "hopper-random-v2.hdf5" in message
    assert "key 'actions' lies outside Hopper-v5's action space" in message
    assert re.search(r"found \[-2\.99\d*, 2\.99\d*\], bounds \[-1, 1\]", message)
    assert "wrong simulator model" not in message


def test_non_finite_states_name_the_file_and_key(bad_data, tmp_path):
    with pytest.raises(DatasetError) as err:
        _import(bad_data["hopper-nan-state"], "hopper-random", tmp_path)
    message = str(err.value)
    assert "\n" not in message and "nan/hopper-random-v2.hdf5" in message
    assert "key 'infos/qpos' has 1 NaN/inf value(s), first at row 123" in message


def test_state_widths_of_another_model_are_named(tmp_path):
    hopper = record("hopper", n=50)
    path = write_d4rl(tmp_path / "hopper-random-v2.hdf5", hopper,
                      **{"infos/qpos": np.zeros((50, 9), np.float32)})
    with pytest.raises(DatasetError, match=r"key 'infos/qpos' has shape \(50, 9\) but Hopper-v5's "
                                           r"simulator state has 6 entries per row"):
        load_dataset(str(path))


def test_the_control_file_matches(bad_data, tmp_path):
    result, _ = _import(bad_data["hopper-good"], "hopper-random", tmp_path)
    assert result["tags"]["consistency_status"] == consistency.MATCHES


def test_v0_episode_ends_follow_d4rls_counter():
    # qlearning_dataset without timeouts: the counter restarts at 0 at a time-limit end and at
    # 1 after a terminal (it is incremented on the terminal's own row); the last row is not
    # looked at.
    terminals = np.zeros(12, bool)
    terminals[2] = True
    assert np.flatnonzero(v0_timeouts(terminals, 4)).tolist() == [5, 9]


def test_a_v0_file_is_read_as_d4rl_reads_it(bad_data, tmp_path):
    recorded = record("halfcheetah", n=2100, seed=1)  # what tests/bad_data.py wrote as -v0
    v0 = read_hdf5(bad_data["halfcheetah-v0"])
    assert v0.extra["timeouts"] == V0_TIMEOUTS
    # The 1000-step limit's last rows (999, 1999) and the file's last row have no successor.
    keep = np.setdiff1d(np.arange(2100), [999, 1999, 2099])
    assert len(v0) == len(keep)
    np.testing.assert_array_equal(v0.next_observations, recorded.next_observations[keep])
    np.testing.assert_array_equal(v0.actions, recorded.actions[keep])
    assert np.flatnonzero(v0.timeouts).tolist() == [998, 1997, 2096]  # rows before each cut
    result, _ = _import(bad_data["halfcheetah-v0"], "halfcheetah-random", tmp_path)
    assert result["tags"]["consistency_status"] == consistency.MATCHES


def _eval(folder, method, task, score):
    d = folder / method / task / "seed0"
    d.mkdir(parents=True)
    (d / "eval.json").write_text(json.dumps({"method": method, "task": task, "seed": 0,
                                             "normalized_score": score}))


def test_verdicts_and_provenance_reach_the_summary_and_captions(bad_data, tmp_path):
    """Every dataset's verdict and origin in summary.md and the tables' captions; a warning
    for data not checked / accepted despite a mismatch / from a policy below its target; the
    published comparisons say the data is not the published data; a model-free grid is not
    said to have trained models."""
    from analysis.datasets import load_records
    from analysis.summary import write_summary
    from analysis.tables import run_tables
    from harness.data import record as records
    from harness.data.d4rl import write_hdf5
    paths = {}
    _, paths["hopper-random"] = _import(bad_data["hopper-good"], "hopper-random", tmp_path)
    _, paths["halfcheetah-random"] = _import(bad_data["walker2d-as-halfcheetah"],
                                             "halfcheetah-random", tmp_path,
                                             accept_mismatch=True)
    # No states: not checked. And a generated "medium" whose policy missed its target.
    no_states = write_d4rl(tmp_path / "src" / "walker2d-random-v2.hdf5", record_walker(),
                           **{"infos/qpos": None, "infos/qvel": None})
    _, paths["walker2d-random"] = _import(no_states, "walker2d-random", tmp_path)
    medium = tmp_path / "datasets" / "hopper-medium.hdf5"
    write_hdf5(load_dataset(str(bad_data["hopper-good"])), medium, generator="datagen.generate",
               policy_normalized_score=18.9, target_normalized_score=40.0, target_reached=False,
               sac_steps=1200, consistency_status="matches", sim_model="hopper.xml")
    records.write_record(medium, records.from_file(medium, "hopper-medium", origin="generated"))
    paths["hopper-medium"] = medium
    runs = tmp_path / "runs"
    for task in paths:
        _eval(runs, "td3bc", task, 30.0)
    datasets = load_records({t: str(p) for t, p in paths.items()})
    tables = run_tables([runs], tmp_path / "tables", models_shared=False, datasets=datasets)
    text = write_summary(None, tables, None, tmp_path / "summary.md", models_shared=False,
                         models=[], datasets=datasets)
    assert "## Data" in text
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()
            if line.startswith("| ") and " | " in line}
    assert "user file" in rows["hopper-random"] and "| matches (hopper.xml" in rows["hopper-random"]
    assert "accepted despite a mismatch (half_cheetah.xml, residual" in rows["halfcheetah-random"]
    assert "not checked (no qpos/qvel): evaluated in walker2d_v5.xml" in rows["walker2d-random"]
    assert "generated here (behaviour policy 18.9 vs target 40: missed)" in rows["hopper-medium"]
    assert "**Warning: unchecked data.** walker2d-random: not checked (no qpos/qvel). The " \
        "results on these tasks rest on data the import check could not replay" in text
    assert "**Warning: data accepted despite a mismatch.** halfcheetah-random: accepted " \
        "despite a mismatch (half_cheetah.xml, residual" in text
    assert "**Warning: behaviour policy below its target.** hopper-medium: behaviour policy " \
        "18.9 vs target 40: missed. This data was generated by a policy" in text
    assert "on data that is not the published data (" in text  # the per-column comparisons
    assert "This run's data is not that data for" in text
    assert "Models: none; every method of this grid is model-free." in text
    caption = tables["td3bc"]["markdown"].splitlines()[0]
    assert "model-based" not in caption and "Data: halfcheetah-random: user file" in caption
    assert "hopper-medium: generated here (behaviour policy 18.9 vs target 40: missed), " \
        "matches (hopper.xml)" in caption
    assert re.search(r"this run's data is not that data for [^:]*hopper-medium", caption)


def test_a_users_file_is_imported_by_path_and_reported_as_theirs(bad_data, tmp_path):
    """data.files: {task: path}: no renaming to D4RL's names; the record says whose file."""
    from harness import plan
    from harness.config import ConfigError
    from harness.data import record as records
    own = write_d4rl(tmp_path / "mine" / "my-hopper.hdf5", record("hopper", n=300))
    cfg = plan.load_config("config/smoke.yaml", {
        "tasks": ["hopper-random"], "results_dir": str(tmp_path / "results"),
        "data": {"source": "files", "files": {"hopper-random": str(own)}}})
    job = plan.import_job(cfg, "hopper-random")
    assert job["config"]["name"] == str(own)
    result = import_step(job)
    rec = records.read_record(job["out"])
    assert rec["origin"] == "file" and rec["source"] == str(own)
    assert rec["sha256"] == records.file_sha256(own) and rec["verdict"] == consistency.MATCHES
    assert result["tags"]["data.origin"] == "file"
    assert records.origin_text(rec).startswith(f"user file {own}, sha256 ")
    assert not records.published_data(rec)
    with pytest.raises(ConfigError, match=r"data\.files: no file for task\(s\) "
                                          r"\['halfcheetah-random'\]"):
        plan.load_config("config/smoke.yaml", {"data": {"source": "files", "files": {
            "hopper-medium-replay": str(own)}}})
    with pytest.raises(ConfigError, match=r"data\.files: set for .* but data\.source is 'local'"):
        plan.load_config("config/smoke.yaml", {"data": {"files": {
            "hopper-medium-replay": str(own)}}})
