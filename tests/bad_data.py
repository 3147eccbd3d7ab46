"""Small D4RL-layout files that look right but are not, recorded in the simulator.

Each case is a file a shape check cannot tell from good data (or, for the input cases, one
whose problem must be named before any physics), written the way D4RL writes its files
(top-level observations / actions / rewards / terminals / timeouts / next_observations,
float32 states under infos/, no attrs):

  walker2d-as-halfcheetah   walker2d data (walker2d.xml) named halfcheetah-random-v2: same
                            widths (17 / 6, 9 + 9 state), another robot
  halfcheetah-as-walker2d   halfcheetah data named walker2d-random-v2: its stored states give
                            its observations in half_cheetah.xml, not in walker2d's models
                            (they clip qvel to +-10 in the observation)
  hopper-actions-x3         hopper data whose stored actions are 3x those stepped (MuJoCo
                            clamped them to the action space)
  hopper-nan-state          hopper data with one NaN in infos/qpos
  halfcheetah-v0            halfcheetah data in D4RL's -v0 layout: no timeouts, no
                            next_observations (2 episodes cut by the 1000-step limit)
  hopper-good               hopper data as recorded (the control case)

`write_cases(folder)` writes them all (seconds); the tests build them once per session
(tests/conftest.py: `bad_data`). By hand: `python tests/bad_data.py FOLDER`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np

from datagen.generate import collect
from harness.data.dataset import Dataset
from harness.envs import make_env

ROWS = 600


def record(family: str, n: int = ROWS, seed: int = 0, model: str | None = None) -> Dataset:
    """n transitions of uniform random actions in `family` (resets on episode end)."""
    env = make_env(family, seed=seed, model=model)
    act_dim = env.action_space.shape[0]
    actions = iter(np.random.default_rng(seed).uniform(-1, 1, (n, act_dim)).astype(np.float32))
    try:
        return collect(env, lambda _obs: next(actions), n, name=f"{family}-random")
    finally:
        env.close()


def write_d4rl(path: Path, d: Dataset, *, timeouts: bool = True,
               next_observations: bool = True, **replace) -> Path:
    """`d` as D4RL stores a file (float32 states; keys dropped or replaced on request)."""
    arrays = {"observations": d.observations, "actions": d.actions, "rewards": d.rewards,
              "terminals": d.terminals, "timeouts": d.timeouts,
              "next_observations": d.next_observations,
              "infos/qpos": d.qpos.astype(np.float32), "infos/qvel": d.qvel.astype(np.float32)}
    if not timeouts:
        del arrays["timeouts"]
    if not next_observations:
        del arrays["next_observations"]
    arrays.update(replace)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value)
    return path


def write_cases(folder: Path) -> dict[str, Path]:
    """Write every case into `folder` (each under the D4RL name it pretends to); {case: path}."""
    folder = Path(folder)
    walker = record("walker2d", model="walker2d.xml")   # D4RL's walker2d model
    cheetah = record("halfcheetah")
    hopper = record("hopper")
    nan_qpos = hopper.qpos.astype(np.float32)
    nan_qpos[123, 2] = np.nan
    # Two full episodes and a bit: the 1000-step limit cuts them (halfcheetah never ends).
    long_cheetah = record("halfcheetah", n=2100, seed=1)
    return {
        "walker2d-as-halfcheetah": write_d4rl(
            folder / "wrong-robot" / "halfcheetah-random-v2.hdf5", walker),
        "halfcheetah-as-walker2d": write_d4rl(
            folder / "other-model" / "walker2d-random-v2.hdf5", cheetah),
        "hopper-actions-x3": write_d4rl(
            folder / "actions" / "hopper-random-v2.hdf5", hopper, actions=3 * hopper.actions),
        "hopper-nan-state": write_d4rl(
            folder / "nan" / "hopper-random-v2.hdf5", hopper, **{"infos/qpos": nan_qpos}),
        "halfcheetah-v0": write_d4rl(
            folder / "v0" / "halfcheetah-random-v0.hdf5", long_cheetah, timeouts=False,
            next_observations=False),
        "hopper-good": write_d4rl(folder / "good" / "hopper-random-v2.hdf5", hopper),
    }


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/bad_data.py FOLDER")
    for case, path in write_cases(Path(sys.argv[1])).items():
        print(f"{case}: {path}")
