"""What produced each run, in the analysis: eval.json's "environment" (and MLflow's env.*
tags) carried into the scores, a warning when runs from different environments (MuJoCo
releases especially) are combined, and the evaluation physics stated when a dataset was
recorded in another release."""
from __future__ import annotations

import json

import pytest

from analysis import aggregate as agg
from analysis.summary import write_summary
from analysis.tables import load_published, make_tables


def _eval(tmp_path, method, task, seed, score, mujoco=None, dataset_mujoco=None):
    data = {"method": method, "task": task, "seed": seed, "normalized_score": score}
    if mujoco:
        data["environment"] = {"python": "3.11.7", "torch_cuda": None,
                               "packages": {"mujoco": mujoco, "torch": "2.13.0+cpu",
                                            "gymnasium": "1.4.0", "numpy": "2.4.6"},
                               "packages_digest": f"digest-{mujoco}"}
        data["device"] = {"type": "cpu"}
    if dataset_mujoco:
        data["dataset_mujoco"] = dataset_mujoco
    path = tmp_path / method / task / f"seed{seed}" / "eval.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    return path


def _runs(tmp_path, releases, dataset_mujoco=None):
    files = []
    for seed, release in enumerate(releases):
        for method, score in (("td3bc", 50.0 + seed), ("dydiff-td3bc", 55.0 + seed)):
            files.append(_eval(tmp_path, method, "hopper-medium", seed, score, release,
                               dataset_mujoco))
    return files


def test_environment_columns_from_eval_json_and_unrecorded_for_old_files(tmp_path):
    df = agg.collect_scores([*_runs(tmp_path / "a", ["4.0.0"]), _eval(
        tmp_path, "mopo", "hopper-medium", 0, 40.0)])
    row = df.set_index("method").loc["td3bc"]
    assert (row.mujoco, row.torch, row.python, row.torch_cuda, row.device) == (
        "4.0.0", "2.13.0+cpu", "3.11.7", agg.CPU_BUILD, "cpu")
    old = df.set_index("method").loc["mopo"]
    assert {old[c] for c in agg.ENV_COLUMNS} == {agg.UNRECORDED}


def test_mlflow_tags_give_the_same_columns():
    tags = {"env.mujoco": "4.0.0", "env.torch": "2.13.0+cpu", "env.python": "3.11.7",
            "env.torch_cuda": "None", "env.packages_digest": "abc", "dataset.mujoco": "2.3.7"}
    env = agg.environment_from_tags(tags)
    assert env["mujoco"] == "4.0.0" and env["torch_cuda"] == agg.CPU_BUILD
    assert env["dataset_mujoco"] == "2.3.7" and env["gymnasium"] == agg.UNRECORDED
    assert set(agg.environment_from_tags({}).values()) == {agg.UNRECORDED}


def test_one_environment_no_warning_several_a_warning_naming_releases_and_counts(tmp_path):
    same = agg.collect_scores(_runs(tmp_path / "same", ["4.0.0", "4.0.0"]))
    assert agg.environment_notes(same) == []
    mixed = agg.collect_scores([*_runs(tmp_path / "mixed", ["4.0.0", "4.0.0", "3.3.7"]),
                                _eval(tmp_path, "mopo", "hopper-medium", 0, 40.0)])
    notes = agg.environment_notes(mixed)
    assert notes[0].startswith("the runs combined here were evaluated in 3 different MuJoCo "
                               "releases: MuJoCo 4.0.0 (4 runs), MuJoCo 3.3.7 (2 runs), "
                               "unrecorded (1 run)")
    assert any("installed package sets" in n for n in notes)
    envs = agg.environments(mixed)
    assert envs.runs.sum() == len(mixed) and len(envs) == 3


def test_summary_and_tables_warn_and_state_the_evaluation_physics(tmp_path):
    files = _runs(tmp_path / "runs", ["4.0.0", "3.3.7"], dataset_mujoco="2.3.7")
    res = agg.run_aggregate(files, tmp_path / "out", reps=20)
    assert (tmp_path / "out" / "environments.csv").exists()
    assert json.loads((tmp_path / "out" / "notes.json").read_text())["environment_notes"]
    text = write_summary(res, None, None, tmp_path / "summary.md")
    assert "**Warning: different environments.** The runs combined here were evaluated in 2 " \
           "different MuJoCo releases: MuJoCo 3.3.7 (2 runs), MuJoCo 4.0.0 (2 runs)" in text
    physics = ("Evaluation physics: 4 of 4 run(s) trained on data recorded in MuJoCo 2.3.7 and "
               "their policies were scored in today's physics (MuJoCo 3.3.7, MuJoCo 4.0.0); "
               "the published numbers were obtained in MuJoCo 2.0 via mujoco-py.")
    assert physics in text
    tables = make_tables(res["scores"], load_published())
    assert physics in tables["td3bc"]["markdown"] and physics in tables["overall"]["markdown"]


def test_no_physics_sentence_when_data_and_scoring_share_a_release(tmp_path):
    df = agg.collect_scores(_runs(tmp_path, ["4.0.0"], dataset_mujoco="4.0.0"))
    assert agg.physics_note(df) is None
    tables = make_tables(df, load_published())
    assert "Evaluation physics" not in tables["overall"]["markdown"]


@pytest.mark.parametrize("dataset_mujoco", [None, "2.0 (mujoco-py)"])
def test_old_runs_without_environment_still_read(tmp_path, dataset_mujoco):
    df = agg.collect_scores([_eval(tmp_path, "td3bc", "hopper-medium", 0, 50.0,
                                   dataset_mujoco=dataset_mujoco)])
    assert df.mujoco.iloc[0] == agg.UNRECORDED
    assert agg.physics_note(df) is None  # the scoring release is not known: no claim
