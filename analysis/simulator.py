"""The MuJoCo simulator as a perfect dynamics model for the rollout-error study: simulator
states from D4RL-layout observations, and `SimulatorModel`, which steps dataset start states
with given actions or a policy (the ground truth every learned model is scored against)."""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from harness.data.dataset import Dataset, DatasetError
from harness.envs import family_of, make_env, restore_state, sim_state, termination_fn
from harness.runtime import device_of


def _to_np(x) -> np.ndarray:
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return x.astype(np.float64)


# ---- simulator states from observations ----------------------------------------------------

# The observation's velocity clip of gymnasium's v5 envs (Hopper/Walker2d `_get_obs` clip qvel
# to +-10; HalfCheetah does not clip), as in D4RL's -v2 envs.
VELOCITY_CLIP = {"hopper": 10.0, "walker2d": 10.0}


def states_from_observations(obs, nq: int, nv: int) -> tuple[np.ndarray, np.ndarray]:
    """(qpos, qvel) of D4RL-layout observations: (..., nq - 1 + nv) = qpos[1:] ++ qvel of the
    locomotion tasks: qpos = [0, obs[:nq-1]] (x = 0: neither the dynamics nor the rewards,
    which use x differences, depend on it), qvel = obs[nq-1:]. Exact unless a velocity was
    clipped in the observation (`clipped_velocities`). Maze2d's observation is the whole
    state (..., nq + nv) = position ++ velocity."""
    obs = np.asarray(obs, dtype=np.float64)
    if obs.shape[-1] == nq + nv:
        return obs[..., :nq].copy(), obs[..., nq:].copy()
    if obs.shape[-1] != nq - 1 + nv:
        raise DatasetError(f"observations have {obs.shape[-1]} dims, not nq - 1 + nv = "
                           f"{nq - 1 + nv} (qpos without x, then qvel) or nq + nv = {nq + nv}"
                           f" (the whole state): cannot reconstruct "
                           f"simulator states from them")
    qpos = np.concatenate([np.zeros(obs.shape[:-1] + (1,)), obs[..., :nq - 1]], -1)
    return qpos, obs[..., nq - 1:].copy()


def clipped_velocities(task: str, obs, nq: int) -> np.ndarray:
    """(N,) bool: the observation shows a velocity at the task's observation clip, so the true
    velocity (and the reconstructed state's next observation) may differ."""
    clip = VELOCITY_CLIP.get(family_of(task))
    obs = np.asarray(obs)
    if clip is None:
        return np.zeros(obs.shape[:-1], bool)
    return (np.abs(obs[..., nq - 1:]) >= clip).any(-1)


# ---- the simulator as a (perfect) model ---------------------------------------------------

class SimulatorModel:
    """The MuJoCo simulator behind the rollout-model interface (open_loop / policy_rollout).

    Start observations are mapped back to simulator states by exact lookup among the dataset
    rows (observations are not full states: the x position is dropped and Hopper/Walker clip
    velocities to +-10). An observation not in the dataset falls back to x = 0 and qvel read
    from the observation, exact whenever no velocity was clipped (x does not affect dynamics
    or rewards, which use x differences)."""

    def __init__(self, task: str, dataset: Dataset | None = None, progress: bool = False):
        self.task = task
        # The model the data replays in (its sim_model attr; None = the gym id's own).
        self.env = make_env(task, model=(dataset.extra.get("sim_model")
                                         if dataset is not None else None))
        self.env.reset(seed=0)
        self.sim = self.env.unwrapped
        self.nq, self.nv = self.sim.model.nq, self.sim.model.nv
        self.done_fn = termination_fn(task)
        self.progress = progress
        self._lookup: dict[bytes, int] = {}
        self._dataset = dataset if dataset is not None and dataset.has_states else None
        if self._dataset is not None:
            obs = np.ascontiguousarray(self._dataset.observations, dtype=np.float32)
            self._lookup = {row.tobytes(): i for i, row in enumerate(obs)}

    def states_for(self, start_obs) -> tuple[np.ndarray, np.ndarray]:
        obs = np.ascontiguousarray(_to_np(start_obs), dtype=np.float32)
        qpos, qvel = states_from_observations(obs, self.nq, self.nv)
        for n, row in enumerate(obs):
            i = self._lookup.get(row.tobytes())
            if i is not None:
                qpos[n], qvel[n] = self._dataset.qpos[i], self._dataset.qvel[i]
        return qpos, qvel

    def _set(self, qpos, qvel) -> np.ndarray:
        # Zero the solver warm start so a step is a pure function of (qpos, qvel, action),
        # independent of which state the env simulated before.
        self.sim.data.qacc_warmstart[:] = 0.0
        return restore_state(self.env, qpos, qvel)

    def simulate(self, qpos: np.ndarray, qvel: np.ndarray, actions: np.ndarray | None = None,
                 agent=None, horizon: int | None = None) -> dict[str, np.ndarray]:
        """Step N simulator states H times with given actions (N,H,a) or the agent's
        deterministic actions. Returns float64 numpy obs, actions, next_obs (N,H,.),
        rewards, terminals (N,H). Stepping continues after a terminal state (masked later)."""
        if (actions is None) == (agent is None):
            raise ValueError("simulate needs exactly one of actions or agent")
        n = len(qpos)
        h = actions.shape[1] if actions is not None else int(horizon)
        qpos, qvel = np.array(qpos, dtype=np.float64), np.array(qvel, dtype=np.float64)
        obs_t = np.stack([self._set(qpos[i], qvel[i]) for i in range(n)])
        out = {k: [] for k in ("obs", "actions", "next_obs", "rewards", "terminals")}
        for t in tqdm(range(h), desc="simulator", disable=not self.progress, leave=False):
            if agent is not None:
                with torch.no_grad():
                    a_t = agent.act(torch.as_tensor(obs_t, dtype=torch.float32,
                                                    device=device_of(agent)),
                                    deterministic=True).cpu().numpy().astype(np.float64)
            else:
                a_t = np.asarray(actions[:, t], dtype=np.float64)
            nxt, rew = np.empty_like(obs_t), np.empty(n)
            for i in range(n):
                self._set(qpos[i], qvel[i])
                nxt[i], rew[i], *_ = self.sim.step(a_t[i])
                qpos[i], qvel[i] = sim_state(self.env)
            for k, v in (("obs", obs_t), ("actions", a_t), ("next_obs", nxt), ("rewards", rew),
                         ("terminals", np.asarray(self.done_fn(nxt)))):
                out[k].append(v)
            obs_t = nxt
        return {k: np.stack(v, axis=1) for k, v in out.items()}

    # -- rollout-model interface --------------------------------------------------------------
    def open_loop(self, start_obs, actions) -> torch.Tensor:
        qpos, qvel = self.states_for(start_obs)
        # The simulator is the CPU's (MuJoCo): its trajectories are CPU tensors.
        next_obs = self.simulate(qpos, qvel, actions=_to_np(actions))["next_obs"]
        return torch.as_tensor(next_obs, device="cpu")

    def policy_rollout(self, start_obs, agent, H: int) -> dict[str, torch.Tensor]:
        qpos, qvel = self.states_for(start_obs)
        sim = self.simulate(qpos, qvel, agent=agent, horizon=H)
        return {k: torch.as_tensor(v, device="cpu") for k, v in sim.items()}
