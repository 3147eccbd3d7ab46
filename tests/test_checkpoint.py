"""harness.checkpoint: the resume bookkeeping every trainer shares, weights_only loads, the
last two checkpoints and the fallback from an unreadable newest one."""
import math
import random
import zipfile
from collections import defaultdict

import numpy as np
import pandas as pd
import pytest
import torch

from harness.checkpoint import (CHECKPOINT, METRICS, CheckpointError, Checkpointer,
                                load_checkpoint, previous_path, rng_state, save_checkpoint,
                                set_rng_state)
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


# ---- weights_only: what the trainers store, and what is refused ----------------------------

def assert_same(a, b, where="state"):
    """Equal values of identical types (a tensor's dtype included), recursively."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def trainer_values(tmp_path) -> dict:
    """One value of every kind the five trainers put in a checkpoint, built by their code.
    (Each agent's training_state: tests/test_agents.py, also with weights_only=True.)"""
    import dataclasses

    from baselines.ensemble import EnsembleConfig
    from datagen.generate import _Replay, _Snapshot
    from dydiff.segments import Normalizer
    from harness.training.buffers import RingBuffer

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()                                           # Adam moments, step counts, betas
    ring = RingBuffer(8, 3, 2, seed=1)
    ring.add({"obs": torch.randn(5, 3), "actions": torch.randn(5, 2),
              "rewards": torch.randn(5), "next_obs": torch.randn(5, 3),
              "terminals": torch.zeros(5)})
    replay = _Replay(6, 3, 2, 4, 3)                      # numpy: float32, bool, float64 (qpos)
    for i in range(4):
        replay.add(observations=np.full(3, i), actions=np.ones(2), rewards=0.5 * i,
                   next_observations=np.zeros(3), terminals=i == 3, timeouts=False,
                   qpos=np.full(4, np.pi), qvel=np.zeros(3))
    gen = np.random.default_rng(7)
    gen.random(3)                                        # PCG64: 128-bit ints in a dict
    ckpt = Checkpointer(tmp_path / "rows.pt", {}, every=1)
    ckpt.log({"step": np.int64(2), "loss": np.float32(0.25), "score": np.float64(1.5),
              "nan": float("nan"), "done": np.bool_(True)})  # numpy scalars in a metrics row
    snap = _Snapshot(dict(net.state_dict()), step=300, score=12.5, reached=True)
    return {"rng": rng_state(), "model": net.state_dict(), "optimizer": opt.state_dict(),
            "generator": torch.Generator().manual_seed(3).get_state(),
            "ring": ring.state_dict(), "replay": replay.state_dict(),
            "np_rng": gen.bit_generator.state, "normalizer": Normalizer(
                "limits", np.zeros(3, np.float32), np.ones(3, np.float32)).state_dict(),
            "config": dataclasses.asdict(EnsembleConfig()), "snapshot": dict(vars(snap)),
            "metrics": ckpt.rows, "evals": [(300, 12.5)], "perm": None, "at": 5}


def test_every_kind_of_trainer_value_round_trips_with_weights_only(tmp_path):
    state = trainer_values(tmp_path)
    save_checkpoint(tmp_path / "c.pt", state)
    loaded = load_checkpoint(tmp_path / "c.pt")  # weights_only=True, and nothing else
    assert_same(state, loaded)
    assert all(type(v) in (int, float, bool) for v in loaded["metrics"][0].values())
    # the restored RNG streams continue exactly where the saved ones were
    set_rng_state(state["rng"])
    want = (random.random(), np.random.rand(), torch.rand(()))
    set_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(())) == want


def test_a_value_weights_only_refuses_is_named_at_save(tmp_path):
    for bad, kind in ((np.zeros(2), "numpy.ndarray"), (np.float64(1.0), "numpy.float64"),
                      (tmp_path, "pathlib"), (defaultdict(int), "collections.defaultdict")):
        with pytest.raises(TypeError, match=rf"state\['rows'\]\[0\]\['x'\] is a {kind}"):
            save_checkpoint(tmp_path / "c.pt", {"rows": [{"x": bad}]})
        assert not (tmp_path / "c.pt").exists()


def _write_payload(path, marker):
    """A checkpoint whose unpickling would create `marker` (as any code could run)."""
    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")
    torch.save({"at": 1, "metrics": [], "payload": Payload()}, path)


def test_a_pickled_code_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    _write_payload(tmp_path / CHECKPOINT, marker)
    with pytest.raises(CheckpointError, match=rf"{CHECKPOINT} \(refused by torch.load\("
                                              r"weights_only=True\): .*open"):
        Checkpointer(tmp_path / CHECKPOINT, {}, every=1)
    with pytest.raises(CheckpointError, match=r"cannot read .*\(refused"):
        load_checkpoint(tmp_path / CHECKPOINT)
    assert not marker.exists()
    torch.load(tmp_path / CHECKPOINT, weights_only=False)  # the unsafe load runs it
    assert marker.exists()


def corrupt(path, how, tmp_path):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "not-torch":
        path.write_text("step,loss\n1,0.5\n")
    elif how == "flipped-byte":  # inside the tensor data: torch.load alone would not notice
        with zipfile.ZipFile(path) as zf:
            info = next(i for i in zf.infolist() if "/data/" in i.filename)
        h = info.header_offset  # local header: 30 bytes, then name and (alignment) extra
        at = h + 30 + int.from_bytes(data[h + 26:h + 28], "little") \
            + int.from_bytes(data[h + 28:h + 30], "little") + 3
        path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:])
    elif how == "payload":
        _write_payload(path, tmp_path / "ran")
    incomplete = "not a complete torch file"
    return {"truncated": incomplete, "empty": incomplete, "not-torch": incomplete,
            "flipped-byte": "corrupt (CRC mismatch in data/",
            "payload": "refused by torch.load"}[how]


HOW = ["truncated", "empty", "not-torch", "flipped-byte", "payload"]


@pytest.mark.parametrize("how", HOW)
def test_unreadable_newest_resumes_from_the_previous(tmp_path, caplog, how):
    _, total = toy_trainer(tmp_path / "a")
    toy_trainer(tmp_path / "b", every=1, stop_at=6)  # checkpoints at 5 (previous) and 6
    newest = tmp_path / "b" / CHECKPOINT
    why = corrupt(newest, how, tmp_path)
    resumed = Checkpointer(newest, {"seed": 0}, every=1, what="toy", columns=["step", "x"])
    assert resumed.start == 5
    assert f"checkpoint {newest} is unreadable: {why}" in caplog.text
    assert f"resuming from the previous checkpoint {previous_path(newest)}" in caplog.text
    # metrics.parquet now matches the checkpoint resumed from (rows of steps 2 and 4)
    assert pd.read_parquet(tmp_path / "b" / METRICS)["step"].tolist() == [2, 4]
    torch.manual_seed(123)
    resumed, again = toy_trainer(tmp_path / "b", every=1)
    assert again == total and not (tmp_path / "ran").exists()
    a, b = (pd.read_parquet(tmp_path / d / METRICS).drop(columns="wall_time_s") for d in "ab")
    pd.testing.assert_frame_equal(a, b)


def test_keeps_the_last_two_and_a_save_cut_between_renames_resumes(tmp_path, caplog):
    toy_trainer(tmp_path, every=1, stop_at=6)
    assert load_checkpoint(tmp_path / CHECKPOINT)["at"] == 6
    assert load_checkpoint(previous_path(tmp_path / CHECKPOINT))["at"] == 5
    assert {p.name for p in tmp_path.iterdir()} == {CHECKPOINT, "checkpoint.prev.pt", METRICS}
    (tmp_path / CHECKPOINT).unlink()  # killed after the first rename, before the second
    assert Checkpointer(tmp_path / CHECKPOINT, {"seed": 0}, every=1).start == 5
    assert f"checkpoint {tmp_path / CHECKPOINT} is missing" in caplog.text


def test_both_unreadable_is_an_error_naming_both(tmp_path):
    toy_trainer(tmp_path, every=1, stop_at=6)
    newest, previous = tmp_path / CHECKPOINT, previous_path(tmp_path / CHECKPOINT)
    corrupt(newest, "truncated", tmp_path)
    corrupt(previous, "empty", tmp_path)
    with pytest.raises(CheckpointError) as err:
        toy_trainer(tmp_path, every=1)
    msg = str(err.value)
    assert isinstance(err.value, ConfigError) and "\n" not in msg  # the CLI's one line
    assert f"{newest} (not a complete torch file" in msg
    assert f"{previous} (not a complete torch file" in msg
    previous.unlink()  # no previous at all: still an error, not a fresh start
    with pytest.raises(CheckpointError, match=f"{previous} \\(missing\\)"):
        toy_trainer(tmp_path, every=1)


def test_an_unreadable_model_file_names_it(tmp_path):
    save_checkpoint(tmp_path / "model.pt", {"model": torch.nn.Linear(2, 2).state_dict()})
    corrupt(tmp_path / "model.pt", "truncated", tmp_path)
    with pytest.raises(CheckpointError, match=f"cannot read {tmp_path / 'model.pt'} "
                                              r"\(not a complete torch file"):
        load_checkpoint(tmp_path / "model.pt")


def test_a_previous_checkpoint_of_another_job_is_still_refused(tmp_path):
    toy_trainer(tmp_path, every=1, stop_at=6)
    corrupt(tmp_path / CHECKPOINT, "truncated", tmp_path)
    with pytest.raises(ConfigError, match="checkpoint.prev.pt was written with a different "
                                          "toy seed"):
        toy_trainer(tmp_path, seed=1)


def test_reward_model_resumed_from_the_previous_checkpoint_equals_uninterrupted(tmp_path,
                                                                                caplog):
    """A real trainer, its newest checkpoint truncated: bit-for-bit the uninterrupted run."""
    from dydiff.reward_model import train_reward_model
    from tests.test_reward_model import FAST, reward_dataset

    ds, cfg = reward_dataset(1000), {**FAST, "checkpoint_every": 10}
    full = train_reward_model(ds, cfg, tmp_path / "a", seed=5, progress=False, device="cpu")
    train_reward_model(ds, cfg, tmp_path / "b", seed=5, progress=False, device="cpu",
                       stop_at=30)  # checkpoints at steps 20 (previous) and 30
    corrupt(tmp_path / "b" / CHECKPOINT, "truncated", tmp_path)
    torch.manual_seed(123)
    caplog.set_level("INFO")
    resumed = train_reward_model(ds, cfg, tmp_path / "b", seed=5, progress=False, device="cpu")
    # resumed from step 20 (a silent fresh start would also end with the same numbers)
    assert f"resuming {tmp_path / 'b' / CHECKPOINT} from step 20" in caplog.text
    a, b = (load_checkpoint(tmp_path / d / "model.pt")["model"] for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (pd.read_parquet(tmp_path / d / METRICS).drop(columns="wall_time_s") for d in "ab")
    pd.testing.assert_frame_equal(ma, mb)
    assert {k: v for k, v in full.items() if k != "wall_time_s"} == \
        {k: v for k, v in resumed.items() if k != "wall_time_s"}


def test_atomic_files_get_the_mode_a_plain_write_would(tmp_path):
    """Not mkstemp's 0600: results on a shared filesystem stay readable by the group."""
    import os
    from harness.checkpoint import atomic_write_text
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        (tmp_path / "b.txt").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "a.txt").stat().st_mode == (tmp_path / "b.txt").stat().st_mode
