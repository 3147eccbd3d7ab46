"""Bad-input checks of a dataset against its task's simulator, before any physics.

A file can be well-formed hdf5 with finite numbers (harness.data.dataset.validate_arrays) and
still not fit the task: observation or action widths of another robot, stored states of
another model's size, or actions outside the action space. The last would otherwise surface
as a wrong simulator model in the replay (MuJoCo clamps each control to its range, so the
transitions replay as those of the clipped actions): the real cause is named here first, one
sentence per problem, naming the file and the key.
"""
from __future__ import annotations

import numpy as np

from harness.data.dataset import Dataset, DatasetError
from harness.envs import make_env, sim_state, task_spec

# How far outside the action space an action may lie and still count as inside it: float32
# rounding of a bound (1 + 1 ulp is 1.2e-7), never a scaled or unclipped policy output.
ACTION_SLACK = 1e-5


def _bounds(low: np.ndarray, high: np.ndarray) -> str:
    if np.all(low == low[0]) and np.all(high == high[0]):
        return f"[{low[0]:g}, {high[0]:g}] in every dimension"
    return f"low {np.round(low, 4).tolist()}, high {np.round(high, 4).tolist()}"


def check_against_task(dataset: Dataset, where: str) -> None:
    """Raise a DatasetError naming `where` (the file or id) and the key when the observation,
    action or state widths are not the task's, or an action lies outside its action space."""
    spec = task_spec(dataset.name)
    if (dataset.obs_dim, dataset.act_dim) != (spec.obs_dim, spec.act_dim):
        raise DatasetError(
            f"dataset {where!r} has observation/action widths ({dataset.obs_dim}, "
            f"{dataset.act_dim}) but {spec.gym_id} has ({spec.obs_dim}, {spec.act_dim}) "
            f"(keys 'observations', 'actions'): it is not {spec.family} data")
    env = make_env(dataset.name)
    try:
        env.reset(seed=0)
        qpos, qvel = sim_state(env)
        low = np.asarray(env.action_space.low, dtype=np.float64)
        high = np.asarray(env.action_space.high, dtype=np.float64)
    finally:
        env.close()
    if dataset.has_states:
        for key, stored, want in (("infos/qpos", dataset.qpos, qpos),
                                  ("infos/qvel", dataset.qvel, qvel)):
            if stored.ndim != 2 or stored.shape[1] != len(want):
                raise DatasetError(
                    f"dataset {where!r}: key '{key}' has shape {tuple(stored.shape)} but "
                    f"{spec.gym_id}'s simulator state has {len(want)} entries per row: the "
                    f"states are not {spec.family}'s")
    actions = dataset.actions.astype(np.float64)
    outside = ((actions < low - ACTION_SLACK) | (actions > high + ACTION_SLACK)).any(-1)
    if outside.any():
        raise DatasetError(
            f"dataset {where!r}: key 'actions' lies outside {spec.gym_id}'s action space in "
            f"{int(outside.sum())} of {len(actions)} rows: found [{actions.min():.4g}, "
            f"{actions.max():.4g}], bounds {_bounds(low, high)}; MuJoCo clamps each control "
            f"to its range, so these transitions are not those of the stored actions (scaled "
            f"or unclipped policy outputs?): clip or rescale the actions to the bounds")
