"""Models per seed: two run seeds train two models of a task, in two folders, with different
weights (so the confidence intervals include model-training variance)."""
from __future__ import annotations

import torch

from harness import plan
from harness.data.d4rl import write_hdf5
from harness.training.models import train_model_step

TASK = "hopper-random"


def test_two_seeds_train_two_different_models(hopper_random, tmp_path):
    cfg = plan.load_config("tests/configs/tiny.yaml", {
        "tasks": [TASK], "seeds": [0, 1], "results_dir": str(tmp_path),
        "models": {"reward": {"train_steps": 20}}})
    write_hdf5(hopper_random, plan.path(cfg, "dataset", task=TASK))
    specs = [plan.model_job(cfg, "reward", TASK, plan.model_seed(cfg, TASK, s)) for s in (0, 1)]
    for spec in specs:
        train_model_step(spec)
    a, b = (torch.load(f"{s['out']}/model.pt", weights_only=True)["model"] for s in specs)
    assert specs[0]["out"] != specs[1]["out"]
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # Each policy of a seed reads its own seed's model folder.
    dirs = {s: plan.policy_job(cfg, "dydiff-td3bc", TASK, s)["model_dirs"]["reward"]
            for s in (0, 1)}
    assert dirs == {0: specs[0]["out"], 1: specs[1]["out"]}
