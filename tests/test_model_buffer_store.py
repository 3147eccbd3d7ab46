"""The model buffer's checkpoint with bounded I/O (harness.training.buffers.RowStore): each row
written once, exactly, in fewer bytes; files a kept checkpoint no longer needs deleted; rows
a killed run wrote after its checkpoint dropped on resume; the bytes of a paper DyDiff job."""
from __future__ import annotations

import pytest
import torch

from harness.checkpoint import CheckpointError
from harness.training.buffers import RingBuffer, RowStore, decode, encode

OBS, ACT = 11, 3


def trajectories(n: int, length: int, seed: int, obs: int = OBS, act: int = ACT
                 ) -> dict[str, torch.Tensor]:
    """`n` model trajectories of `length` steps, rows in trajectory order (as the DyDiff
    generator returns them): each row's next_obs is the next row's obs within a trajectory."""
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(n, length + 1, obs, generator=g)
    done = torch.zeros(n, length)
    done[0, -1] = 1.0
    return {"obs": states[:, :-1].reshape(-1, obs), "next_obs": states[:, 1:].reshape(-1, obs),
            "actions": torch.rand(n * length, act, generator=g),
            "rewards": torch.randn(n * length, generator=g), "terminals": done.reshape(-1)}


def same(a: RingBuffer, b: RingBuffer) -> bool:
    return (a.ptr, a.size, a.added) == (b.ptr, b.size, b.added) and all(
        torch.equal(a.data[k][: a.size], b.data[k][: b.size]) for k in a.data)


def test_encoding_is_exact_and_smaller():
    rows = trajectories(8, 25, 0)
    rows["next_obs"][7] += 1e-7  # a row that does not chain, though nearly equal
    blob = encode(rows)
    back = decode(blob)
    assert all(torch.equal(back[k], rows[k]) for k in rows)
    assert blob["terminals"].dtype == torch.bool
    assert len(blob["next_obs_unchained"]) == 8 + 1  # each trajectory's last row, and row 7
    odd = {**rows, "terminals": rows["terminals"] * 0.5}  # not 0/1: kept as floats
    assert torch.equal(decode(encode(odd))["terminals"], odd["terminals"])


def test_each_checkpoint_writes_only_the_rows_added_since_the_last(tmp_path):
    ring = RingBuffer(1000, OBS, ACT, seed=1, store=tmp_path / "store")
    ring.add(trajectories(10, 20, 0))
    ring.state_dict()
    ring.add(trajectories(2, 20, 1))
    state = ring.state_dict()
    assert state["store"] == {"rows": 240} and "data" not in state
    assert [(lo, hi) for lo, hi, _ in ring.store.files()] == [(0, 200), (200, 240)]
    fresh = RingBuffer(1000, OBS, ACT, seed=99, store=tmp_path / "store")
    fresh.load_state_dict(state)
    assert same(ring, fresh)
    assert torch.equal(ring.sample(64)["next_obs"], fresh.sample(64)["next_obs"])


def test_turnover_keeps_two_checkpoints_of_rows_on_disk(tmp_path):
    ring = RingBuffer(100, OBS, ACT, store=tmp_path / "store")
    states = []
    for call in range(12):
        ring.add(trajectories(3, 20, call))  # 60 rows a call, the buffer turns over
        states.append(ring.state_dict())
        held = sum(hi - lo for lo, hi, _ in ring.store.files())
        assert held <= 2 * ring.capacity, ring.store.files()
    # The previous checkpoint (checkpoint.prev.pt) still loads; the one before it may not.
    previous = RingBuffer(100, OBS, ACT, store=tmp_path / "store")
    previous.load_state_dict(states[-2])
    assert previous.added == 11 * 60 and previous.size == 100


def test_rows_written_after_the_checkpoint_by_a_killed_run_are_dropped(tmp_path):
    ring = RingBuffer(500, OBS, ACT, seed=2, store=tmp_path / "store")
    ring.add(trajectories(5, 20, 0))
    state = ring.state_dict()
    ring.add(trajectories(5, 20, 1))
    ring.state_dict()           # rows 100..200 written, then the job was killed before its
    resumed = RingBuffer(500, OBS, ACT, seed=2, store=tmp_path / "store")  # checkpoint
    resumed.load_state_dict(state)
    assert resumed.added == 100 and [(lo, hi) for lo, hi, _ in resumed.store.files()] == [(0, 100)]
    assert torch.equal(resumed.data["obs"][:100], trajectories(5, 20, 0)["obs"])
    resumed.add(trajectories(5, 20, 7))  # the run goes on with other rows than the killed one
    later = resumed.state_dict()
    again = RingBuffer(500, OBS, ACT, seed=2, store=tmp_path / "store")
    again.load_state_dict(later)
    assert same(resumed, again)
    for _, _, path in again.store.files():
        path.unlink()
    with pytest.raises(CheckpointError, match=r"rows 0\.\.200 are missing"):
        RingBuffer(500, OBS, ACT, store=tmp_path / "store").load_state_dict(later)


def test_a_checkpoint_from_before_the_store_still_loads(tmp_path):
    old = RingBuffer(50, OBS, ACT, seed=1)
    old.add(trajectories(2, 10, 0))
    state = old.state_dict()
    state.pop("added")
    new = RingBuffer(50, OBS, ACT, seed=1, store=tmp_path / "store")
    new.load_state_dict(state)
    assert same(old, new) and RowStore(tmp_path / "store").files() == []


def test_bytes_per_checkpoint_of_a_dydiff_like_buffer(tmp_path):
    """Files on disk, before (each checkpoint holds the buffer's rows) and after, at walker2d's
    dimensions with DyDiff's 99-step trajectories. Here 1188 new rows of 2000 a checkpoint:
    appending and encoding, 0.395 of the bytes. Where the buffer turns over between
    checkpoints, as in a paper DyDiff job, encoding alone: 168 -> 99 bytes a row, 0.589
    (measured at 20k rows; docs/performance.md gives the paper job's arithmetic)."""
    from harness.checkpoint import save_checkpoint
    o, a = 17, 6
    old, new = RingBuffer(2000, o, a), RingBuffer(2000, o, a, store=tmp_path / "s")
    written = {"old": 0, "new": 0}
    for call in range(6):
        rows = trajectories(12, 99, call, o, a)  # 1188 rows a call, a checkpoint after each
        old.add(rows)
        new.add(rows)
        on_disk = set((tmp_path / "s").glob("*"))
        save_checkpoint(tmp_path / "old.pt", {"model_buffer": old.state_dict()})
        save_checkpoint(tmp_path / "new.pt", {"model_buffer": new.state_dict()})
        written["old"] += (tmp_path / "old.pt").stat().st_size
        written["new"] += (tmp_path / "new.pt").stat().st_size + sum(
            p.stat().st_size for p in (tmp_path / "s").glob("*") if p not in on_disk)
    ratio = written["new"] / written["old"]
    print(f"bytes written, row store / whole buffer: {ratio:.3f}")
    assert ratio < 0.62
