"""Record a small D4RL-layout hdf5 file in whatever MuJoCo release the running Python has.

Standalone on purpose: it imports only mujoco, numpy and h5py (no harness, no gymnasium), so it
runs in a throwaway environment holding an older MuJoCo release (scripts/measure_release_drift.py
and tests/data/README.md say how such an environment is made and call this file with its
interpreter). The model is an MJCF file given by path (the harness side passes the installed
gymnasium's own asset, or a deliberately changed copy of it), and the env step is gymnasium's
MuJoCo env step done by hand, so every release runs the very same model and step:

- hopper / walker2d / halfcheetah (gymnasium's Hopper/Walker2d/HalfCheetah v4 and v5: the same
  step): data.ctrl = action; mj_step frame_skip times (4 / 4 / 5); observation = qpos[1:] ++
  qvel (hopper and walker2d clip qvel to +-10 in the observation); reset = mj_resetData, then
  qpos0 + U(-s, s), qvel + U(-s, s) (halfcheetah: + s * N(0, 1)), s = 5e-3 (halfcheetah 0.1),
  mj_forward; episodes end on gymnasium's v5 health checks or after 1000 steps.
- pointmass (gymnasium-robotics' PointMaze step, the simulator of the harness's maze2d): the
  action clipped to +-1; qvel clipped to +-5 and mj_forward; data.ctrl = action; one mj_step;
  observation = qpos ++ qvel in the simulator's own coordinates (the harness side maps them to
  D4RL's); reset to one of `--reset-points` + U(-0.1, 0.1), velocity N(0, 0.1^2); no
  termination, `--episode-steps` per episode.

`--gymnasium ENV_ID` records through the release's own gymnasium env instead (its reset and
step; the environment must have gymnasium installed), to check the hand-made step against it.

Actions: `random` (uniform in the control range every step), `sine` (per episode and actuator a
random amplitude, frequency and phase: smoother, gait-like motion), or `mixed` (each episode
one or the other, alternating). Output (D4RL layout): observations, actions, rewards,
next_observations (float32, as D4RL stores them), terminals, timeouts (bool), infos/qpos,
infos/qvel (`--state-dtype`: float64, or float32 as D4RL's files), attrs mujoco_version (the
release that recorded it), recorder, model_file, family, actions, seed.

    python scripts/record_release.py --family hopper --xml HOPPER_XML --steps 600 --out F.hdf5
"""
from __future__ import annotations

import argparse
import json
import os

import h5py
import mujoco
import numpy as np

FAMILIES = {  # frame_skip, reset noise, qvel clip in the observation, ctrl cost weight
    "hopper": (4, 5e-3, 10.0, 1e-3),
    "walker2d": (4, 5e-3, 10.0, 1e-3),
    "halfcheetah": (5, 0.1, None, 0.1),
    "pointmass": (1, 0.1, None, 0.0),
}


def healthy(family: str, qpos: np.ndarray, qvel: np.ndarray) -> bool:
    """gymnasium v5 is_healthy (hopper_v5.py, walker2d_v5.py); halfcheetah / the point: always."""
    if family == "hopper":
        state = np.concatenate([qpos, qvel])[2:]
        return bool(np.all(np.abs(state) < 100) and qpos[1] > 0.7 and abs(qpos[2]) < 0.2)
    if family == "walker2d":
        return bool(0.8 < qpos[1] < 2.0 and -1.0 < qpos[2] < 1.0)
    return True


class Recorder:
    def __init__(self, family: str, xml: str, seed: int, reset_points=None):
        self.family = family
        self.frame_skip, self.noise, self.clip, self.ctrl_cost = FAMILIES[family]
        self.model = mujoco.MjModel.from_xml_path(xml)
        self.data = mujoco.MjData(self.model)
        self.rng = np.random.default_rng(seed)
        self.reset_points = np.asarray(reset_points if reset_points is not None else [[0, 0]],
                                       dtype=np.float64)
        lo, hi = self.model.actuator_ctrlrange.T
        self.ctrl_lo, self.ctrl_hi = lo.copy(), hi.copy()

    def obs(self) -> np.ndarray:
        qpos, qvel = self.data.qpos.copy(), self.data.qvel.copy()
        if self.family == "pointmass":
            return np.concatenate([qpos, qvel])
        if self.clip is not None:
            qvel = np.clip(qvel, -self.clip, self.clip)
        return np.concatenate([qpos[1:], qvel])

    def set_state(self, qpos, qvel) -> None:
        self.data.qpos[:] = qpos
        self.data.qvel[:] = qvel
        mujoco.mj_forward(self.model, self.data)

    def reset(self) -> np.ndarray:
        mujoco.mj_resetData(self.model, self.data)
        nq, nv = self.model.nq, self.model.nv
        if self.family == "pointmass":
            start = self.reset_points[self.rng.integers(len(self.reset_points))]
            self.set_state(start + self.rng.uniform(-0.1, 0.1, nq),
                           self.rng.standard_normal(nv) * 0.1)
        else:
            qpos = self.model.qpos0 + self.rng.uniform(-self.noise, self.noise, nq)
            if self.family == "halfcheetah":
                qvel = self.noise * self.rng.standard_normal(nv)
            else:
                qvel = self.rng.uniform(-self.noise, self.noise, nv)
            self.set_state(qpos, qvel)
        return self.obs()

    def step(self, action: np.ndarray):
        x_before = float(self.data.qpos[0])
        if self.family == "pointmass":
            action = np.clip(action, -1.0, 1.0)
            self.set_state(self.data.qpos.copy(), np.clip(self.data.qvel, -5.0, 5.0))
        self.data.ctrl[:] = action
        for _ in range(self.frame_skip):  # = mj_step(nstep=frame_skip) of newer releases
            mujoco.mj_step(self.model, self.data)
        obs = self.obs()
        dt = self.model.opt.timestep * self.frame_skip
        alive = healthy(self.family, self.data.qpos, self.data.qvel)
        reward = (float(self.data.qpos[0]) - x_before) / dt \
            - self.ctrl_cost * float(np.sum(np.square(action)))
        if self.family in ("hopper", "walker2d"):
            reward += 1.0
        return obs, reward, not alive

    def actions(self, kind: str, length: int) -> np.ndarray:
        """`length` actions of one episode."""
        lo, hi = self.ctrl_lo, self.ctrl_hi
        if kind == "random":
            return self.rng.uniform(lo, hi, (length, len(lo)))
        amp = self.rng.uniform(0.3, 1.0, len(lo))
        freq = self.rng.uniform(0.5, 3.0, len(lo))          # cycles per second
        phase = self.rng.uniform(0, 2 * np.pi, len(lo))
        dt = self.model.opt.timestep * self.frame_skip
        t = np.arange(length)[:, None] * dt
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        return mid + half * amp * np.sin(2 * np.pi * freq * t + phase)


class GymnasiumRecorder(Recorder):
    """The same recording through the release's own gymnasium env (`--gymnasium Hopper-v4`):
    its reset and step instead of the hand-made ones, to check that those step as gymnasium
    does in that release. The env loads its own model file (`--xml` is not used)."""

    def __init__(self, family: str, env_id: str, seed: int):
        import gymnasium
        self.env = gymnasium.make(env_id).unwrapped
        self.family, self.env_id = family, env_id
        self.frame_skip, self.noise, self.clip, self.ctrl_cost = FAMILIES[family]
        self.model, self.data = self.env.model, self.env.data
        self.rng = np.random.default_rng(seed)
        self.env.reset(seed=seed)
        self.ctrl_lo, self.ctrl_hi = self.model.actuator_ctrlrange.T.copy()

    def reset(self) -> np.ndarray:
        return self.env.reset()[0]

    def step(self, action: np.ndarray):
        obs, reward, terminated, _truncated, _ = self.env.step(action.astype(np.float32))
        return obs, float(reward), bool(terminated)


def record(args) -> dict:
    if args.gymnasium:
        rec = GymnasiumRecorder(args.family, args.gymnasium, args.seed)
    else:
        rec = Recorder(args.family, args.xml, args.seed,
                       json.loads(args.reset_points) if args.reset_points else None)
    n, nq, nv, nu = args.steps, rec.model.nq, rec.model.nv, rec.model.nu
    obs_dim = len(rec.obs())
    out = {"observations": np.empty((n, obs_dim)), "next_observations": np.empty((n, obs_dim)),
           "actions": np.empty((n, nu)), "rewards": np.empty(n),
           "terminals": np.zeros(n, bool), "timeouts": np.zeros(n, bool),
           "qpos": np.empty((n, nq)), "qvel": np.empty((n, nv))}
    episode, t = 0, 0
    while t < n:
        kind = args.actions if args.actions != "mixed" else ("random", "sine")[episode % 2]
        obs = rec.reset()
        plan = rec.actions(kind, args.episode_steps).astype(np.float32)  # stored as float32
        for k in range(args.episode_steps):
            if t == n:
                break
            out["qpos"][t], out["qvel"][t] = rec.data.qpos, rec.data.qvel
            action = plan[k].astype(np.float64)
            next_obs, reward, done = rec.step(action)
            out["observations"][t], out["next_observations"][t] = obs, next_obs
            out["actions"][t], out["rewards"][t] = plan[k], reward
            out["terminals"][t] = done
            out["timeouts"][t] = (k == args.episode_steps - 1) and not done
            obs, t = next_obs, t + 1
            if done:
                break
        episode += 1
    if not (out["terminals"][-1] or out["timeouts"][-1]):
        out["timeouts"][-1] = True  # every episode in the file ends
    state = np.float64 if args.state_dtype == "float64" else np.float32
    tmp = args.out + ".part"
    with h5py.File(tmp, "w") as f:
        gz = {"compression": "gzip", "compression_opts": 9}
        for key in ("observations", "next_observations", "actions", "rewards"):
            f.create_dataset(key, data=out[key].astype(np.float32), **gz)
        for key in ("terminals", "timeouts"):
            f.create_dataset(key, data=out[key], **gz)
        f.create_dataset("infos/qpos", data=out["qpos"].astype(state), **gz)
        f.create_dataset("infos/qvel", data=out["qvel"].astype(state), **gz)
        f.attrs.update({"mujoco_version": mujoco.__version__,
                        "recorder": "scripts/record_release.py",
                        "model_file": (f"{args.gymnasium}'s own" if args.gymnasium
                                       else os.path.basename(args.xml)),
                        "stepped_by": (f"gymnasium {args.gymnasium}" if args.gymnasium
                                       else "scripts/record_release.py"),
                        "family": args.family,
                        "actions": args.actions, "seed": args.seed})
    os.replace(tmp, args.out)
    return {"out": args.out, "mujoco": mujoco.__version__, "rows": n, "episodes": episode}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", required=True, choices=sorted(FAMILIES))
    p.add_argument("--xml", help="the MJCF model file to record in")
    p.add_argument("--gymnasium", metavar="ENV_ID",
                   help="instead: step the release's own gymnasium env (e.g. Hopper-v4)")
    p.add_argument("--out", required=True, help="the hdf5 file to write")
    p.add_argument("--steps", type=int, default=1000, help="transitions (rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--actions", choices=("random", "sine", "mixed"), default="mixed")
    p.add_argument("--episode-steps", type=int, default=1000)
    p.add_argument("--state-dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--reset-points", default=None,
                   help="pointmass: JSON list of [x, y] start positions (simulator frame)")
    args = p.parse_args(argv)
    if not (args.xml or args.gymnasium):
        p.error("one of --xml or --gymnasium is required")
    print(json.dumps(record(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
