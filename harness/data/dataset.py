"""The one in-memory dataset format every step sees, whatever the source (D4RL, Minari, local).

Transitions are flat arrays in D4RL order; episodes end where `terminals | timeouts` is set
(or where the next observation does not continue the trajectory at the last row).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from harness.envs import family_of, normalized_score

REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts",
                 "next_observations")
OPTIONAL_KEYS = ("qpos", "qvel")


class DatasetError(ValueError):
    """A dataset is missing or malformed; the message lists every problem found."""


@dataclass
class Dataset:
    observations: np.ndarray        # (N, obs_dim) float32
    actions: np.ndarray             # (N, act_dim) float32
    rewards: np.ndarray             # (N,) float32
    next_observations: np.ndarray   # (N, obs_dim) float32
    terminals: np.ndarray           # (N,) bool: true environment termination
    timeouts: np.ndarray            # (N,) bool: episode cut by the time limit (not terminal)
    name: str = "unknown"           # D4RL-style name, e.g. 'hopper-medium-v2'
    qpos: np.ndarray | None = None  # (N, nq) simulator state at `observations`, if stored
    qvel: np.ndarray | None = None  # (N, nv)
    source: str = ""                # where it was read from (path or Minari id)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = validate_arrays({k.name: getattr(self, k.name) for k in fields(self)
                                    if k.name in REQUIRED_KEYS + OPTIONAL_KEYS})
        if problems:
            raise DatasetError(f"dataset {self.source or self.name} is malformed: "
                               + "; ".join(problems))
        self.observations = self.observations.astype(np.float32, copy=False)
        self.actions = self.actions.astype(np.float32, copy=False)
        self.rewards = self.rewards.astype(np.float32, copy=False).reshape(-1)
        self.next_observations = self.next_observations.astype(np.float32, copy=False)
        self.terminals = self.terminals.astype(bool, copy=False).reshape(-1)
        self.timeouts = self.timeouts.astype(bool, copy=False).reshape(-1)

    def __len__(self) -> int:
        return len(self.observations)

    @property
    def family(self) -> str:
        return family_of(self.name)

    @property
    def obs_dim(self) -> int:
        return self.observations.shape[1]

    @property
    def act_dim(self) -> int:
        return self.actions.shape[1]

    @property
    def has_states(self) -> bool:
        return self.qpos is not None and self.qvel is not None

    def episode_ends(self) -> np.ndarray:
        """Boolean (N,): row i is the last step of an episode."""
        ends = self.terminals | self.timeouts
        # A break in continuity also ends an episode (D4RL files do not always flag them).
        gap = np.zeros(len(self), dtype=bool)
        gap[:-1] = np.abs(self.next_observations[:-1] - self.observations[1:]).max(-1) > 1e-5
        ends = ends | gap
        ends[-1] = True
        return ends

    def episodes(self) -> list[slice]:
        """Row slices of the episodes, in order."""
        ends = np.flatnonzero(self.episode_ends())
        starts = np.concatenate([[0], ends[:-1] + 1])
        return [slice(int(s), int(e) + 1) for s, e in zip(starts, ends)]

    def episode_returns(self) -> np.ndarray:
        return np.array([self.rewards[sl].sum() for sl in self.episodes()], dtype=np.float64)

    def normalized_returns(self) -> np.ndarray:
        """D4RL normalised score of each *complete* episode (ends in terminal or timeout)."""
        eps = [sl for sl in self.episodes()
               if self.terminals[sl.stop - 1] or self.timeouts[sl.stop - 1]]
        rets = np.array([self.rewards[sl].sum() for sl in eps], dtype=np.float64)
        return normalized_score(self.name, rets)

    def subset(self, index: np.ndarray) -> "Dataset":
        """Rows `index` as a new Dataset (episode boundaries are those of the selected rows)."""
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return Dataset(self.observations[index], self.actions[index], self.rewards[index],
                       self.next_observations[index], self.terminals[index],
                       self.timeouts[index], self.name, pick(self.qpos), pick(self.qvel),
                       self.source)

    def summary(self) -> dict:
        rets = self.normalized_returns()
        return {"name": self.name, "transitions": len(self), "episodes": len(self.episodes()),
                "obs_dim": self.obs_dim, "act_dim": self.act_dim, "has_states": self.has_states,
                "normalized_return_mean": float(rets.mean()) if len(rets) else float("nan"),
                "normalized_return_max": float(rets.max()) if len(rets) else float("nan")}


def concatenate(datasets: list[Dataset], name: str) -> Dataset:
    """Stack datasets (e.g. medium + expert -> medium-expert); episode boundaries are kept."""
    cat = lambda key: np.concatenate([getattr(d, key) for d in datasets])  # noqa: E731
    parts = [d for d in datasets]
    for d in parts[:-1]:  # make each part's last row an episode end
        if not (d.terminals[-1] or d.timeouts[-1]):
            d.timeouts[-1] = True
    states = all(d.has_states for d in parts)
    return Dataset(cat("observations"), cat("actions"), cat("rewards"),
                   cat("next_observations"), cat("terminals"), cat("timeouts"), name,
                   cat("qpos") if states else None, cat("qvel") if states else None)


def holdout_split(perm, holdout_ratio: float, max_holdout: int):
    """(train, holdout) rows of `perm`, a random permutation of the n row indices (numpy or
    torch): the first min(max_holdout, int(n * holdout_ratio)) are held out (MBPO's rule).
    The caller draws `perm`, so each model keeps its own seeded draw."""
    n_hold = min(max_holdout, int(len(perm) * holdout_ratio))
    return perm[n_hold:], perm[:n_hold]


def _key(name: str) -> str:
    """The hdf5 key of a Dataset field (D4RL stores the states under infos/)."""
    return f"infos/{name}" if name in OPTIONAL_KEYS else name


def validate_arrays(arrays: dict[str, np.ndarray | None]) -> list[str]:
    """Every problem with a dict of D4RL arrays (missing key, shapes, lengths, dtype, NaN/inf)."""
    problems = []
    for key in REQUIRED_KEYS:
        if arrays.get(key) is None:
            problems.append(f"missing key '{key}'")
    present = {k: np.asarray(v) for k, v in arrays.items() if v is not None}
    lengths = {k: len(v) for k, v in present.items() if v.ndim > 0}
    n = lengths.get("observations")
    for key, length in lengths.items():
        if n is not None and length != n:
            problems.append(f"'{_key(key)}' has {length} rows but 'observations' has {n}")
    if n == 0:
        problems.append("dataset is empty (0 transitions)")
    for key, arr in present.items():
        if key in ("terminals", "timeouts"):
            if arr.dtype != bool and not (np.issubdtype(arr.dtype, np.number)
                                          and np.isin(arr, (0, 1)).all()):
                problems.append(f"'{_key(key)}' must be boolean (0/1), got dtype {arr.dtype}")
            continue
        if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
            problems.append(f"'{_key(key)}' must be numeric, got dtype {arr.dtype}")
            continue
        want_ndim = 1 if key == "rewards" else 2
        if arr.ndim != want_ndim and not (key == "rewards" and arr.ndim == 2 and arr.shape[1] == 1):
            problems.append(f"'{_key(key)}' must be {want_ndim}-D, got shape {arr.shape}")
        bad = ~np.isfinite(arr)
        if bad.any():
            problems.append(f"key '{_key(key)}' has {int(bad.sum())} NaN/inf value(s), first at "
                            f"row {int(np.argwhere(bad)[0][0])}")
    obs, nxt = present.get("observations"), present.get("next_observations")
    if obs is not None and nxt is not None and obs.ndim == 2 and nxt.ndim == 2 \
            and obs.shape[1] != nxt.shape[1]:
        problems.append(f"'next_observations' width {nxt.shape[1]} != 'observations' width "
                        f"{obs.shape[1]}")
    return problems
