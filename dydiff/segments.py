"""Fixed-length [state, action] trajectory segments for the dynamics diffusion model.

Every episode of length L (states s_0..s_{L-1}, actions a_0..a_{L-1}, and the final next state
s_L) becomes L + 1 rows [s_t, a_t], the last row [s_L, 0] with its action masked out, so that
the model also learns the episode's last transition. Episodes with L + 1 >= H give every window
of H consecutive rows (stride 1, as the authors' `MujocoDataset` indexer). Shorter episodes (common
in *-medium-replay) give one window padded by repeating the last state with zero action; the
padded rows are masked out of the loss (the authors pad with a constant -1 - eps instead and train
on it; masking keeps the padding value out of the learned distribution).

Windows are not materialised: `Segments` keeps one flat row array plus window start indices, so
hopper-medium (1M transitions, ~1M windows) costs O(rows) memory, not O(windows * H).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from harness.data.dataset import Dataset, DatasetError


@dataclass
class Normalizer:
    """x_norm = (x - shift) / scale per channel ([state, action] channels).

    kind 'limits' maps each channel's [min, max] to [-1, 1] (the authors' LimitsNormalizer);
    'gaussian' uses mean/std.
    """
    kind: str
    shift: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    # (device, dtype) -> (shift, scale) tensors, built once per device instead of per call.
    _tensors: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def fit(cls, data: np.ndarray, kind: Literal["limits", "gaussian"] = "limits",
            eps: float = 1e-6) -> "Normalizer":
        data = np.asarray(data, dtype=np.float64)
        if kind == "limits":
            lo, hi = data.min(0), data.max(0)
            shift, scale = (hi + lo) / 2, (hi - lo) / 2
        elif kind == "gaussian":
            shift, scale = data.mean(0), data.std(0)
        else:
            raise ValueError(f"normalizer kind must be 'limits' or 'gaussian', got {kind!r}")
        # A constant channel (e.g. an unused joint) would divide by zero.
        return cls(kind, shift.astype(np.float32), np.maximum(scale, eps).astype(np.float32))

    def normalize(self, x):
        shift, scale = self._like(x)
        return (x - shift) / scale

    def unnormalize(self, x):
        shift, scale = self._like(x)
        return x * scale + shift

    def slice(self, sl: slice) -> "Normalizer":
        return Normalizer(self.kind, self.shift[sl], self.scale[sl])

    def _like(self, x):
        if not torch.is_tensor(x):
            return self.shift, self.scale
        key = (x.device, x.dtype)
        if key not in self._tensors:
            self._tensors[key] = (torch.as_tensor(self.shift, dtype=x.dtype, device=x.device),
                                  torch.as_tensor(self.scale, dtype=x.dtype, device=x.device))
        return self._tensors[key]

    def state_dict(self) -> dict:
        # tensors, not arrays: model.pt is loaded with weights_only=True
        return {"kind": self.kind, "shift": torch.from_numpy(self.shift.copy()),
                "scale": torch.from_numpy(self.scale.copy())}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Normalizer":
        return cls(state["kind"], np.asarray(state["shift"], np.float32),
                   np.asarray(state["scale"], np.float32))


@dataclass
class Segments:
    rows: torch.Tensor         # (R, D) normalised [state, action] rows of all episodes
    state_valid: torch.Tensor  # (R,) bool: row's state is real data (not padding)
    action_valid: torch.Tensor  # (R,) bool: row's action is real (false on last/padded rows)
    starts: torch.Tensor       # (M,) long: first row of each window
    horizon: int
    obs_dim: int
    act_dim: int
    normalizer: Normalizer

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def to(self, device: torch.device | str) -> "Segments":
        """The same segments with their tensors on `device` (training gathers batches there,
        with no host-to-device copy per step)."""
        return dataclasses.replace(self, **{k: getattr(self, k).to(device) for k in
                                            ("rows", "state_valid", "action_valid", "starts")})

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows `index` (on the segments' device) -> (x (B,H,D) normalised, loss mask
        (B,H,D) float)."""
        rows = self.starts[index][:, None] + torch.arange(self.horizon, device=self.device)
        x = self.rows[rows]
        mask = torch.cat([self.state_valid[rows, None].expand(-1, -1, self.obs_dim),
                          self.action_valid[rows, None].expand(-1, -1, self.act_dim)], -1)
        return x, mask.float()


def make_segments(dataset: Dataset, horizon: int, normalizer: Normalizer | None = None,
                  kind: Literal["limits", "gaussian"] = "limits") -> Segments:
    """Cut `dataset`'s episodes into windows of `horizon` rows (see module docstring)."""
    if horizon < 2:
        raise ValueError(f"segment horizon must be >= 2, got {horizon}")
    if normalizer is None:
        normalizer = Normalizer.fit(
            np.concatenate([dataset.observations, dataset.actions], 1), kind)
    o, a = dataset.obs_dim, dataset.act_dim
    if normalizer.shift.shape != (o + a,):
        raise DatasetError(f"dataset {dataset.name}: normaliser has {normalizer.shift.shape[0]} "
                           f"channels but observations+actions have {o + a}")
    eps = dataset.episodes()
    lengths = np.array([sl.stop - sl.start for sl in eps])
    # Rows per episode: its L transitions + the final next state, padded up to the horizon.
    n_rows = np.maximum(lengths + 1, horizon)
    offsets = np.concatenate([[0], np.cumsum(n_rows)[:-1]])
    total = int(n_rows.sum())
    states = np.empty((total, o), np.float32)
    actions = np.zeros((total, a), np.float32)
    state_valid = np.zeros(total, bool)
    action_valid = np.zeros(total, bool)
    starts = []
    # One vectorised copy per episode (the per-episode loop is over episodes, not time steps).
    for sl, length, off, n in zip(eps, lengths, offsets, n_rows):
        states[off:off + length] = dataset.observations[sl]
        states[off + length:off + n] = dataset.next_observations[sl.stop - 1]
        actions[off:off + length] = dataset.actions[sl]
        state_valid[off:off + length + 1] = True
        action_valid[off:off + length] = True
        starts.append(off + np.arange(n - horizon + 1))
    rows = normalizer.normalize(np.concatenate([states, actions], 1))
    # Padded rows hold raw zero actions; set them to normalised 0 (the channel centre) instead.
    rows[~action_valid, o:] = 0.0
    return Segments(torch.from_numpy(rows.astype(np.float32)), torch.from_numpy(state_valid),
                    torch.from_numpy(action_valid),
                    torch.from_numpy(np.concatenate(starts).astype(np.int64)), horizon, o, a,
                    normalizer)
