"""Replay buffers for offline training: the static real dataset and a FIFO buffer of model rollouts.

Both hold tensors on the training device and sample with their own `torch.Generator`, so the
sampling stream is independent of the agents' and generators' global-RNG draws and can be saved
and restored exactly (`state_dict` / `load_state_dict` are part of the loop's checkpoint).
Batches use the agent interface's keys: obs, actions, rewards, next_obs, terminals (float 0/1).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from harness.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from harness.data.dataset import Dataset

KEYS = ("obs", "actions", "rewards", "next_obs", "terminals")


def _generator(seed: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


class RealBuffer:
    """The offline dataset as tensors; sampling is uniform with replacement (as in D4RL baselines)."""

    def __init__(self, dataset: Dataset, seed: int = 0, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        as_t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=self.device)  # noqa: E731
        self.data = {"obs": as_t(dataset.observations), "actions": as_t(dataset.actions),
                     "rewards": as_t(dataset.rewards).reshape(-1),
                     "next_obs": as_t(dataset.next_observations),
                     "terminals": as_t(dataset.terminals).reshape(-1)}
        self.size = len(dataset)
        self.gen = _generator(seed, self.device)

    def __len__(self) -> int:
        return self.size

    def _index(self, n: int) -> torch.Tensor:
        return torch.randint(0, self.size, (n,), generator=self.gen, device=self.device)

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        idx = self._index(n)
        return {k: v[idx] for k, v in self.data.items()}

    def sample_obs(self, n: int) -> torch.Tensor:
        """Start states for model rollouts, drawn uniformly from the dataset's observations."""
        return self.data["obs"][self._index(n)]

    def state_dict(self) -> dict:
        # The data itself is rebuilt from the dataset; the size guards against resuming on
        # a different dataset.
        return {"size": self.size, "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != self.size:
            raise ValueError(f"checkpoint was written for a dataset of {state['size']} "
                             f"transitions, this one has {self.size}")
        self.gen.set_state(state["gen"])


class RingBuffer:
    """FIFO buffer of model transitions: once full, the oldest rows are overwritten.

    MOPO/MBPO keep `model_retain_epochs` rollout batches, i.e. capacity =
    model_retain_epochs * (transitions one generator call can return).

    Row j of those ever kept (`added` counts them) sits at j % capacity. With a `store`
    folder, `state_dict` writes only the rows kept since its last call there (`RowStore`)
    and returns a few numbers; without one it returns the rows themselves.
    """

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, seed: int = 0,
                 device: str | torch.device = "cpu", store: str | Path | None = None):
        if capacity <= 0:
            raise ValueError(f"RingBuffer capacity must be positive, got {capacity}")
        self.capacity, self.device = int(capacity), torch.device(device)
        shapes = {"obs": (obs_dim,), "actions": (act_dim,), "rewards": (),
                  "next_obs": (obs_dim,), "terminals": ()}
        self.data = {k: torch.zeros((self.capacity, *s), device=self.device)
                     for k, s in shapes.items()}
        self.ptr = 0    # next row to write
        self.size = 0
        self.added = 0  # rows kept since the start
        self.gen = _generator(seed, self.device)
        self.store = RowStore(store) if store is not None else None

    def __len__(self) -> int:
        return self.size

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        missing = [k for k in KEYS if k not in batch]
        if missing:
            raise KeyError(f"rollout batch lacks key(s) {missing}; expected {list(KEYS)}")
        m = len(batch["obs"])
        if m == 0:
            return
        keep = min(m, self.capacity)  # a batch larger than the buffer keeps its newest rows
        idx = (self.ptr + torch.arange(keep, device=self.device)) % self.capacity
        for k in KEYS:
            value = batch[k][m - keep:].to(self.device, torch.float32)
            self.data[k][idx] = value.reshape(self.data[k][idx].shape)
        self.ptr = (self.ptr + keep) % self.capacity
        self.size = min(self.size + keep, self.capacity)
        self.added += keep

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        if self.size == 0:
            raise RuntimeError("cannot sample from an empty model buffer")
        idx = torch.randint(0, self.size, (n,), generator=self.gen, device=self.device)
        return {k: v[idx] for k, v in self.data.items()}

    def rows(self, first: int, end: int) -> dict[str, torch.Tensor]:
        """Rows `first` .. `end` - 1 of those ever kept (the last `size` only), on the CPU."""
        if not self.added - self.size <= first <= end <= self.added:
            raise IndexError(f"rows {first}..{end} of the model buffer are not held "
                             f"(it holds {self.added - self.size}..{self.added})")
        idx = torch.arange(first, end, device=self.device) % self.capacity
        return {k: v[idx].cpu() for k, v in self.data.items()}

    def state_dict(self) -> dict:
        state = {"capacity": self.capacity, "ptr": self.ptr, "size": self.size,
                 "added": self.added, "gen": self.gen.get_state()}
        if self.store is not None:
            return {**state, "store": self.store.save(self)}
        # Only the filled rows (the buffer may be large and mostly empty early on).
        return {**state, "data": {k: v[: self.size].cpu().clone() for k, v in self.data.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["capacity"] != self.capacity:
            raise ValueError(f"checkpoint model buffer has capacity {state['capacity']}, "
                             f"this one {self.capacity}")
        self.ptr, self.size = state["ptr"], state["size"]
        self.added = state.get("added", self.size)  # a checkpoint from before the row store
        if "data" in state:
            for k, v in state["data"].items():
                self.data[k][: self.size] = v.to(self.device)
        else:
            if self.store is None:
                raise ValueError("this checkpoint keeps the model buffer's rows in a row store; "
                                 "give the buffer its folder (store=)")
            for first, part in self.store.load(state["store"], self.added - self.size):
                idx = torch.arange(first, first + len(part["obs"]),
                                   device=self.device) % self.capacity
                for k, v in part.items():
                    self.data[k][idx] = v.to(self.device)
        self.gen.set_state(state["gen"])


class RowStore:
    """The model buffer's rows on disk, written once: each checkpoint appends a file of the
    rows kept since the one before (`rows-<first>-<end>.pt`, atomic), or of the last
    `capacity` when more were kept; files neither kept checkpoint needs are deleted.

    Rows are stored exactly, in fewer bytes: a row's next_obs only where it is not the next
    row's obs (a model trajectory's rows chain: DyDiff's 99 of 100), terminals as bools where
    they are 0/1. The checkpoint holds {rows}: where they end; `load` puts them back, after
    removing what a killed run wrote past its checkpoint.
    """

    PATTERN = re.compile(r"^rows-(\d+)-(\d+)\.pt$")

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.written = 0          # rows on disk end here
        self.needed_from = 0      # the oldest row the previous checkpoint needs

    def files(self) -> list[tuple[int, int, Path]]:
        found = []
        if self.folder.is_dir():
            for path in self.folder.iterdir():
                m = self.PATTERN.match(path.name)
                if m:
                    found.append((int(m.group(1)), int(m.group(2)), path))
        return sorted(found)

    def clear(self) -> None:
        """A fresh start: rows of an earlier run are not this one's."""
        for _, _, path in self.files():
            path.unlink()
        self.written = self.needed_from = 0

    def save(self, buffer: "RingBuffer") -> dict:
        end = buffer.added
        first = max(self.written, end - buffer.size)
        if first < end:
            save_checkpoint(self.folder / f"rows-{first:012d}-{end:012d}.pt",
                            encode(buffer.rows(first, end)))
            self.written = end
        # Kept after this save: this checkpoint and the one before it (checkpoint.prev.pt).
        oldest = min(self.needed_from, end - buffer.size)
        for lo, hi, path in self.files():
            if hi <= oldest:
                path.unlink()
        self.needed_from = end - buffer.size
        return {"rows": end}

    def load(self, state: dict, first: int) -> list[tuple[int, dict]]:
        """[(row, rows)] covering rows `first` .. state['rows'] - 1; files written after the
        checkpoint by a run that was then killed are removed (or cut) first."""
        end = state["rows"]
        for lo, hi, path in self.files():
            if lo >= end:
                path.unlink()
            elif hi > end:  # cut at the checkpoint: the rows after it are the killed run's
                part = {k: v[: end - lo] for k, v in decode(load_checkpoint(path)).items()}
                save_checkpoint(self.folder / f"rows-{lo:012d}-{end:012d}.pt", encode(part))
                path.unlink()
        out, covered = [], first
        for lo, hi, path in self.files():
            if hi <= first or lo >= end:
                continue
            if lo > covered:
                break
            part = decode(load_checkpoint(path))
            skip = max(first - lo, 0)
            out.append((lo + skip, {k: v[skip:] for k, v in part.items()}))
            covered = hi
        if covered < end:
            raise CheckpointError(f"{self.folder}: the model buffer's rows {covered}..{end} are "
                                  f"missing (files {[p.name for *_, p in self.files()]}); "
                                  f"remove checkpoint.pt and checkpoint.prev.pt to start over")
        self.written, self.needed_from = end, first
        return out


def encode(rows: dict[str, torch.Tensor]) -> dict:
    """Rows in fewer bytes, exactly: next_obs only where it is not the next row's obs,
    terminals as bools when all are 0/1."""
    obs, nxt, term = rows["obs"], rows["next_obs"], rows["terminals"]
    chained = torch.zeros(len(obs), dtype=torch.bool, device=obs.device)
    if len(obs) > 1:  # bitwise equal (the same floats), not close
        chained[:-1] = (nxt[:-1].view(torch.int32) == obs[1:].view(torch.int32)).all(1)
    binary = bool(((term == 0) | (term == 1)).all())
    return {"obs": obs, "actions": rows["actions"], "rewards": rows["rewards"],
            "chained": chained, "next_obs_unchained": nxt[~chained].clone(),
            "terminals": term.bool() if binary else term}


def decode(blob: dict) -> dict[str, torch.Tensor]:
    obs, chained = blob["obs"], blob["chained"]
    nxt = torch.empty_like(obs)
    nxt[chained] = obs[1:][chained[:-1]] if len(obs) > 1 else obs[:0]
    nxt[~chained] = blob["next_obs_unchained"]
    return {"obs": obs, "actions": blob["actions"], "rewards": blob["rewards"],
            "next_obs": nxt, "terminals": blob["terminals"].float()}
