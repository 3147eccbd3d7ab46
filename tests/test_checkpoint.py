"""harness.checkpoint.Checkpointer: the resume bookkeeping every trainer shares."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from harness.checkpoint import CHECKPOINT, METRICS, Checkpointer
from harness.config import ConfigError


def toy_trainer(out, steps=10, every=3, stop_at=None, seed=0):
    """A trainer in miniature: one global-RNG draw per step, a metrics row every 2 steps."""
    ckpt = Checkpointer(out / CHECKPOINT, {"seed": seed}, every=every, what="toy",
                        columns=["step", "x"])
    if not ckpt.resumed:
        torch.manual_seed(seed)
    total = 0.0 if not ckpt.resumed else ckpt.state["total"]
    for step in range(ckpt.start + 1, steps + 1):
        total += torch.rand(()).item()
        if step % 2 == 0:
            ckpt.log({"step": step, "x": total} | ({"extra": 1.0} if step == 4 else {}))
        if ckpt.maybe_save(step, step == steps, lambda: {"total": total}, stop_at):
            break
    return ckpt, total


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, caplog):
    full, total = toy_trainer(tmp_path / "a")
    cut, _ = toy_trainer(tmp_path / "b", stop_at=5)
    assert cut.saved_at == 5 and len(cut.rows) == 2
    torch.manual_seed(123)  # the global RNG at restart must not matter
    caplog.set_level("INFO")
    resumed, again = toy_trainer(tmp_path / "b")
    assert resumed.start == 5 and again == total
    # the line job logs are searched for (tests/test_slurm.py)
    assert f"resuming {tmp_path / 'b' / CHECKPOINT} from step 5" in caplog.text
    a, b = (pd.read_parquet(tmp_path / d / METRICS) for d in "ab")
    assert list(a.columns) == ["step", "x", "extra", "wall_time_s"]  # leading, sorted, wall
    assert math.isnan(a["extra"].iloc[0]) and a["extra"].iloc[1] == 1.0
    pd.testing.assert_frame_equal(a.drop(columns="wall_time_s"), b.drop(columns="wall_time_s"))
    # wall time keeps counting across the restart
    assert (np.diff(b["wall_time_s"]) >= 0).all()


def test_saves_every_n_at_the_end_and_at_stop_at(tmp_path):
    ckpt, saves = Checkpointer(tmp_path / CHECKPOINT, {}, every=3), []
    stops = [ckpt.maybe_save(at, at == 8, lambda: saves.append(at) or {}, stop_at=4)
             for at in range(1, 9)]
    assert saves == [3, 4, 7, 8]  # every 3 counts since the last save, stop_at, the end
    assert stops == [False, False, False, True, False, False, False, False]
    assert not (tmp_path / METRICS).exists()  # no columns: no table


def test_stop_at_is_the_first_count_at_or_after_it(tmp_path):
    toy_trainer(tmp_path, steps=10, every=100, stop_at=4)
    # a run resumed past stop_at is not stopped again; stop_at at the end is no stop
    ckpt, _ = toy_trainer(tmp_path, steps=10, every=100, stop_at=4)
    assert ckpt.saved_at == 10
    ckpt = Checkpointer(tmp_path / "other.pt", {}, every=100)
    assert not ckpt.maybe_save(5, True, dict, stop_at=5)


def test_checkpoint_of_another_job_is_refused(tmp_path):
    toy_trainer(tmp_path, stop_at=3)
    with pytest.raises(ConfigError, match="different toy seed; remove it"):
        toy_trainer(tmp_path, seed=1)
