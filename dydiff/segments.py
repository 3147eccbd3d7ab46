"""Fixed-length [state, action] trajectory segments for the dynamics diffusion model.

Two paddings (`padding`):
  constant (the authors', training/dataset.py:259-291,332-341): an episode of length L is its
      L rows [s_t, a_t] (observations and actions only); L >= H gives every window of H
      consecutive rows (stride 1, their `get_trajectories` indexer), L <= H one window whose
      rows after L hold the constant -1 - 1e-4 in every normalised channel; every entry,
      padding included, is in the loss (they train on it).
  repeat (this harness's former one): L + 1 rows, the last [s_L, 0] (the final next state,
      action masked out) so the model also learns the episode's last transition; episodes with
      L + 1 < H give one window padded by repeating the last state with zero action, and the
      padded rows are masked out of the loss (keeping the padding value out of the learned
      distribution).

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
    # (R,) bool: the row's state / action is in the loss: real data with repeat padding (false
    # on the last and padded rows' actions, padded states); every row with constant padding.
    state_valid: torch.Tensor
    action_valid: torch.Tensor
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


PAD_VALUE = -1.0 - 1e-4  # the authors' constant padding (training/dataset.py:332,340-341)


def make_segments(dataset: Dataset, horizon: int, normalizer: Normalizer | None = None,
                  kind: Literal["limits", "gaussian"] = "limits",
                  padding: Literal["constant", "repeat"] = "constant") -> Segments:
    """Cut `dataset`'s episodes into windows of `horizon` rows (see module docstring)."""
    if padding not in ("constant", "repeat"):
        raise ValueError(f"padding must be 'constant' or 'repeat', got {padding!r}")
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
    constant = padding == "constant"
    # Rows per episode: its L transitions (+ the final next state with repeat), padded up to
    # the horizon.
    n_rows = np.maximum(lengths + (0 if constant else 1), horizon)
    offsets = np.concatenate([[0], np.cumsum(n_rows)[:-1]])
    total = int(n_rows.sum())
    states = np.empty((total, o), np.float32)
    actions = np.zeros((total, a), np.float32)
    state_valid = np.zeros(total, bool)
    action_valid = np.zeros(total, bool)
    starts = []
    # One vectorised copy per episode (the per-episode loop is over episodes, not time steps).
    real = np.zeros(total, bool)  # rows holding an episode's own [s_t, a_t]
    for sl, length, off, n in zip(eps, lengths, offsets, n_rows):
        states[off:off + length] = dataset.observations[sl]
        states[off + length:off + n] = dataset.next_observations[sl.stop - 1]
        actions[off:off + length] = dataset.actions[sl]
        real[off:off + length] = True
        state_valid[off:off + length + 1] = True
        action_valid[off:off + length] = True
        starts.append(off + np.arange(n - horizon + 1))
    rows = normalizer.normalize(np.concatenate([states, actions], 1))
    if constant:  # the authors': constant padding, every entry in the loss
        rows[~real] = PAD_VALUE
        state_valid[:] = True
        action_valid[:] = True
    else:
        # Padded rows hold raw zero actions; set them to normalised 0 (the channel centre).
        rows[~action_valid, o:] = 0.0
    return Segments(torch.from_numpy(rows.astype(np.float32)), torch.from_numpy(state_valid),
                    torch.from_numpy(action_valid),
                    torch.from_numpy(np.concatenate(starts).astype(np.int64)), horizon, o, a,
                    normalizer)
