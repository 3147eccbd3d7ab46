"""Replay buffers for offline training: the static real dataset and a FIFO buffer of model rollouts.

Both hold tensors on the training device and sample with their own `torch.Generator`, so the
sampling stream is independent of the agents' and generators' global-RNG draws and can be saved
and restored exactly (`state_dict` / `load_state_dict` are part of the loop's checkpoint).
Batches use the agent interface's keys: obs, actions, rewards, next_obs, terminals (float 0/1).
"""
from __future__ import annotations

import torch

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
    """

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, seed: int = 0,
                 device: str | torch.device = "cpu"):
        if capacity <= 0:
            raise ValueError(f"RingBuffer capacity must be positive, got {capacity}")
        self.capacity, self.device = int(capacity), torch.device(device)
        shapes = {"obs": (obs_dim,), "actions": (act_dim,), "rewards": (),
                  "next_obs": (obs_dim,), "terminals": ()}
        self.data = {k: torch.zeros((self.capacity, *s), device=self.device)
                     for k, s in shapes.items()}
        self.ptr = 0    # next row to write
        self.size = 0
        self.gen = _generator(seed, self.device)

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

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        if self.size == 0:
            raise RuntimeError("cannot sample from an empty model buffer")
        idx = torch.randint(0, self.size, (n,), generator=self.gen, device=self.device)
        return {k: v[idx] for k, v in self.data.items()}

    def state_dict(self) -> dict:
        # Only the filled rows are saved (the buffer may be large and mostly empty early on).
        return {"capacity": self.capacity, "ptr": self.ptr, "size": self.size,
                "gen": self.gen.get_state(),
                "data": {k: v[: self.size].cpu().clone() for k, v in self.data.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["capacity"] != self.capacity:
            raise ValueError(f"checkpoint model buffer has capacity {state['capacity']}, "
                             f"this one {self.capacity}")
        self.ptr, self.size = state["ptr"], state["size"]
        for k, v in state["data"].items():
            self.data[k][: self.size] = v.to(self.device)
        self.gen.set_state(state["gen"])
