"""Build D4RL-style datasets locally from gymnasium MuJoCo v5 (no D4RL / Minari download needed).

D4RL's recipe (Fu et al. 2020, Sec. 5): one online SAC run per task; 'medium' = rollouts of
the policy snapshot that reaches about 1/3 of expert performance, 'medium-replay' = the SAC
replay buffer up to that snapshot, 'expert' = rollouts of the final (expert) policy,
'medium-expert' = medium ++ expert, 'random' = a uniformly random policy. Every file has
infos/qpos + infos/qvel (the simulator state at each observation) so rollouts can be replayed
in the simulator, and attrs recording seed, config hash, SAC steps and the score reached.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from harness.config import ConfigError, config_hash, require
from harness.data import consistency
from harness.data.d4rl import write_hdf5
from harness.data.dataset import Dataset, concatenate
from harness.envs import (DATASET_KINDS, family_of, make_env, normalized_score, sim_state,
                          task_spec)
from agents.sac import SAC, SACConfig
from harness.checkpoint import Checkpointer
from harness.runtime import git_sha, seed_everything

log = logging.getLogger(__name__)

ActFn = Callable[[np.ndarray], np.ndarray]


def collect(env, act_fn: ActFn, n_steps: int, *, name: str, progress: bool = False,
            desc: str = "collect") -> Dataset:
    """Step `env` for `n_steps` transitions with `act_fn(obs) -> action`, resetting on episode end.

    The env must already be reset-seeded (`make_env(..., seed=...)`); the first episode starts
    from a fresh `reset()` whose randomness continues the env's own seeded stream. The last
    transition is flagged as a timeout when it does not end an episode, so every episode in the
    file is complete (as D4RL's own collection scripts do).
    """
    spec = task_spec(name)
    obs_buf = np.empty((n_steps, spec.obs_dim), np.float32)
    next_buf = np.empty((n_steps, spec.obs_dim), np.float32)
    act_buf = np.empty((n_steps, spec.act_dim), np.float32)
    rew_buf = np.empty(n_steps, np.float32)
    term_buf = np.zeros(n_steps, bool)
    tout_buf = np.zeros(n_steps, bool)
    nq, nv = env.unwrapped.model.nq, env.unwrapped.model.nv
    qpos_buf = np.empty((n_steps, nq), np.float64)
    qvel_buf = np.empty((n_steps, nv), np.float64)

    obs, _ = env.reset()
    for t in tqdm(range(n_steps), desc=desc, disable=not progress, leave=False):
        qpos_buf[t], qvel_buf[t] = sim_state(env)
        action = act_fn(obs)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        obs_buf[t], act_buf[t], rew_buf[t], next_buf[t] = obs, action, reward, next_obs
        term_buf[t], tout_buf[t] = terminated, truncated and not terminated
        obs = env.reset()[0] if (terminated or truncated) else next_obs
    if not (term_buf[-1] or tout_buf[-1]):
        tout_buf[-1] = True
    return Dataset(obs_buf, act_buf, rew_buf, next_buf, term_buf, tout_buf, name=name,
                   qpos=qpos_buf, qvel=qvel_buf, source="generated",
                   extra={"recorded_mujoco": consistency.mujoco_version()})


def random_dataset(task: str, n_steps: int, seed: int, progress: bool = False) -> Dataset:
    """`n_steps` transitions of uniformly random actions in the task's MuJoCo v5 env.

    Named '<family>-random' (D4RL style). Same seed -> identical arrays.
    """
    family = family_of(task)
    if n_steps <= 0:
        raise ValueError(f"n_steps must be positive, got {n_steps}")
    env = make_env(family, seed=seed)
    space = env.action_space
    # All actions drawn up front in one call; they do not depend on the state.
    actions = np.random.default_rng(seed).uniform(space.low, space.high,
                                                  (n_steps, space.shape[0])).astype(np.float32)
    counter = iter(actions)
    try:
        return collect(env, lambda _obs: next(counter), n_steps, name=f"{family}-random",
                       progress=progress, desc=f"{family}-random")
    finally:
        env.close()


def policy_act_fn(agent: SAC, deterministic: bool = False) -> ActFn:
    """obs -> action of `agent` (stochastic by default: D4RL samples from its SAC policies)."""
    def act(obs: np.ndarray) -> np.ndarray:
        obs_t = torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0)
        return agent.act(obs_t, deterministic=deterministic)[0].numpy()
    return act


@dataclass
class GenerateConfig:
    """D4RL-like local datasets. Defaults follow D4RL: 1M transitions per kind, one SAC run
    of up to 1M env steps, medium = about 1/3 of expert, expert = fully trained SAC."""
    n_transitions: int = 1_000_000   # per rollout kind (random, medium, expert)
    sac_steps: int = 1_000_000       # online SAC budget in env steps
    start_steps: int = 10_000        # uniform-random exploration first (SAC's reference value)
    update_after: int = 1_000        # env steps before the first gradient update
    updates_per_step: int = 1
    batch_size: int = 256
    medium_target: float = 33.0      # normalised score of the 'medium' snapshot (1/3 of expert)
    expert_target: float = 100.0     # normalised score at which training stops ('expert')
    eval_every: int = 10_000         # env steps between evaluations (at the next episode end)
    eval_episodes: int = 10
    checkpoint_every: int = 50_000   # env steps between SAC checkpoints (at episode ends)
    # Haarnoja et al. 2018 use 3e-4 for every learning rate in online SAC.
    sac: SACConfig = field(default_factory=lambda: SACConfig(actor_lr=3e-4, alpha_lr=3e-4))

    def validate(self) -> None:
        for key in ("n_transitions", "sac_steps", "batch_size", "eval_every", "eval_episodes",
                    "checkpoint_every", "updates_per_step"):
            require(getattr(self, key) > 0, key, f"must be positive, got {getattr(self, key)}")
        require(0 <= self.start_steps <= self.sac_steps, "start_steps",
                f"must be in [0, sac_steps={self.sac_steps}], got {self.start_steps}")
        require(self.update_after >= 0, "update_after", "must be >= 0")
        require(self.medium_target < self.expert_target, "medium_target",
                f"must be below expert_target ({self.expert_target}), got {self.medium_target}")
        self.sac.validate()


@dataclass
class _Snapshot:
    """A policy snapshot taken during the SAC run."""
    actor: dict            # actor state_dict
    step: int              # env steps of SAC training when taken
    score: float           # evaluated normalised score (deterministic policy)
    reached: bool          # whether the target was reached (else: best policy within budget)


class _Replay:
    """The online SAC replay buffer; it is also the 'medium-replay' dataset, hence qpos/qvel."""

    KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts",
            "qpos", "qvel")

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, nq: int, nv: int):
        self.size = 0
        self.data = {"observations": np.empty((capacity, obs_dim), np.float32),
                     "actions": np.empty((capacity, act_dim), np.float32),
                     "rewards": np.empty(capacity, np.float32),
                     "next_observations": np.empty((capacity, obs_dim), np.float32),
                     "terminals": np.zeros(capacity, bool), "timeouts": np.zeros(capacity, bool),
                     "qpos": np.empty((capacity, nq), np.float64),
                     "qvel": np.empty((capacity, nv), np.float64)}

    def add(self, **row) -> None:
        for key, value in row.items():
            self.data[key][self.size] = value
        self.size += 1

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        t = lambda key: torch.as_tensor(self.data[key][idx], dtype=torch.float32)  # noqa: E731
        return {"obs": t("observations"), "actions": t("actions"), "rewards": t("rewards"),
                "next_obs": t("next_observations"), "terminals": t("terminals")}

    def dataset(self, n: int, name: str) -> Dataset:
        return Dataset(name=name, source="generated", **{k: self.data[k][:n] for k in self.KEYS})

    def state_dict(self) -> dict:
        # Tensors (same dtypes), not arrays: checkpoints are loaded with weights_only=True.
        return {"size": self.size,
                **{k: torch.from_numpy(self.data[k][:self.size].copy()) for k in self.KEYS}}

    def load_state_dict(self, state: dict) -> None:
        self.size = state["size"]
        for key in self.KEYS:
            self.data[key][:self.size] = state[key].numpy()


class OnlineSAC:
    """The one online SAC run per task family that every non-random kind comes from.

    Runs until the targets that `needed` asks for are reached or the budget is spent,
    checkpointing at episode ends (so a resume restarts from a fresh `reset()` whose RNG
    state is part of the checkpoint, and matches an uninterrupted run exactly).
    """

    def __init__(self, family: str, cfg: GenerateConfig, seed: int, ckpt_path: Path):
        self.family, self.cfg, self.seed, self.ckpt_path = family, cfg, seed, ckpt_path
        spec = task_spec(family)
        seed_everything(seed)
        self.env = make_env(family, seed=seed)
        model = self.env.unwrapped.model
        self.agent = SAC(spec.obs_dim, spec.act_dim, cfg.sac)
        self.replay = _Replay(cfg.sac_steps, spec.obs_dim, spec.act_dim, model.nq, model.nv)
        self.rng = np.random.default_rng(seed)  # random-phase actions and minibatch indices
        self.step = 0
        self.medium: _Snapshot | None = None
        self.expert: _Snapshot | None = None
        self.best: _Snapshot | None = None
        self.evals: list[tuple[int, float]] = []
        self.next_eval = max(cfg.eval_every, cfg.start_steps)
        self._resume()

    # ---- checkpointing -------------------------------------------------------------------
    def _state(self) -> dict:
        return {"agent": self.agent.training_state(), "replay": self.replay.state_dict(),
                "sac_rng": self.rng.bit_generator.state,
                "env_rng": self.env.unwrapped.np_random.bit_generator.state,
                # snapshots as plain dicts: weights_only refuses a dataclass
                **{k: None if getattr(self, k) is None else dict(vars(getattr(self, k)))
                   for k in ("medium", "expert", "best")},
                "evals": self.evals, "next_eval": self.next_eval}

    def _resume(self) -> None:
        expect = {"config": config_hash(self.cfg), "seed": self.seed}
        self.ckpt = Checkpointer(self.ckpt_path, expect, every=self.cfg.checkpoint_every,
                                 what="SAC", unit="env step")
        if not self.ckpt.resumed:
            return
        state = self.ckpt.state
        self.agent.load_training_state(state["agent"])
        self.replay.load_state_dict(state["replay"])
        self.rng.bit_generator.state = state["sac_rng"]
        self.env.unwrapped.np_random.bit_generator.state = state["env_rng"]
        for key in ("medium", "expert", "best"):
            setattr(self, key, None if state[key] is None else _Snapshot(**state[key]))
        self.evals, self.next_eval = state["evals"], state["next_eval"]
        self.step = self.ckpt.start

    def save(self) -> None:
        self.ckpt.save(self.step, **self._state())

    # ---- training ------------------------------------------------------------------------
    def done(self, need_expert: bool) -> bool:
        if self.step >= self.cfg.sac_steps:
            return True
        return self.medium is not None and (not need_expert or self.expert is not None)

    def evaluate(self) -> float:
        from harness.training.evaluation import evaluate
        # Eval episodes are seeded by the step so a resumed run evaluates identically.
        result = evaluate(self.agent, self.family, self.cfg.eval_episodes,
                          seed=int(np.random.SeedSequence([self.seed, self.step])
                                   .generate_state(1)[0]))
        return result["normalized_score"]

    def _snapshot(self, score: float, reached: bool) -> _Snapshot:
        actor = {k: v.clone() for k, v in self.agent.actor.state_dict().items()}
        return _Snapshot(actor, self.step, score, reached)

    def run(self, need_expert: bool, progress: bool = True, stop_at: int | None = None) -> None:
        """Train until done; `stop_at` (an env step) interrupts after checkpointing the first
        episode end at or after it (for tests of exact resume)."""
        cfg, env = self.cfg, self.env
        space = env.action_space
        bar = tqdm(total=cfg.sac_steps, initial=self.step, desc=f"SAC {self.family}",
                   disable=not progress, leave=False)
        obs, _ = env.reset()
        while not self.done(need_expert):
            qpos, qvel = sim_state(env)
            if self.step < cfg.start_steps:
                action = self.rng.uniform(space.low, space.high).astype(np.float32)
            else:
                action = policy_act_fn(self.agent)(obs)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            self.replay.add(observations=obs, actions=action, rewards=reward,
                            next_observations=next_obs, terminals=terminated,
                            timeouts=truncated and not terminated, qpos=qpos, qvel=qvel)
            self.step += 1
            bar.update(1)
            if self.step >= cfg.update_after and self.replay.size >= cfg.batch_size:
                for _ in range(cfg.updates_per_step):
                    idx = self.rng.integers(0, self.replay.size, cfg.batch_size)
                    info = self.agent.update(self.replay.batch(idx))
                bar.set_postfix(q=f"{info['q_mean']:.1f}", alpha=f"{info['alpha']:.3f}",
                                refresh=False)
            if not (terminated or truncated):
                obs = next_obs
                if self.step < cfg.sac_steps:
                    continue
            # Episode end (or budget end): evaluate, snapshot and checkpoint only here.
            if self.step >= self.next_eval or self.step >= cfg.sac_steps:
                self._evaluate_and_snapshot(bar)
            if self.ckpt.maybe_save(self.step, self.done(need_expert), self._state, stop_at):
                break
            obs, _ = env.reset()
        bar.close()

    def _evaluate_and_snapshot(self, bar) -> None:
        score = self.evaluate()
        self.evals.append((self.step, score))
        self.next_eval = self.step + self.cfg.eval_every
        log.info("SAC %s step %d: normalised score %.1f", self.family, self.step, score)
        bar.set_description(f"SAC {self.family} (score {score:.0f})", refresh=False)
        if self.best is None or score > self.best.score:
            self.best = self._snapshot(score, reached=False)
        if self.medium is None and score >= self.cfg.medium_target:
            self.medium = self._snapshot(score, reached=True)
        if self.expert is None and score >= self.cfg.expert_target:
            self.expert = self._snapshot(score, reached=True)

    def snapshot(self, kind: str) -> _Snapshot:
        """The 'medium' or 'expert' snapshot; once the budget is spent without reaching the
        target, the best policy so far (with a warning; the file's attrs record it)."""
        snap = getattr(self, kind)
        if snap is not None:
            return snap
        if self.step < self.cfg.sac_steps:
            raise RuntimeError(f"SAC run for {self.family} stopped before the {kind} target")
        if self.best is None:  # cannot happen after run(): the budget end is evaluated
            raise RuntimeError(f"SAC run for {self.family} has no evaluated policy")
        target = getattr(self.cfg, f"{kind}_target")
        log.warning("%s: SAC budget (%d env steps) ran out before the %s target %.1f; using "
                    "the best policy so far (score %.1f at step %d)", self.family,
                    self.cfg.sac_steps, kind, target, self.best.score, self.best.step)
        return self.best

    def actor(self, snap: _Snapshot) -> SAC:
        """An agent whose actor holds the snapshot's weights (for rollouts)."""
        spec = task_spec(self.family)
        agent = SAC(spec.obs_dim, spec.act_dim, self.cfg.sac)
        agent.actor.load_state_dict(snap.actor)
        return agent.eval()


def _kind_seed(seed: int, kind: str) -> int:
    """Independent, reproducible seed per dataset kind."""
    return int(np.random.SeedSequence([seed, DATASET_KINDS.index(kind)]).generate_state(1)[0])


def rollout_dataset(agent: SAC, family: str, kind: str, n_steps: int, seed: int,
                    progress: bool = False) -> Dataset:
    """`n_steps` transitions of `agent`'s stochastic policy, named '<family>-<kind>'."""
    seed_everything(seed)
    env = make_env(family, seed=seed)
    try:
        return collect(env, policy_act_fn(agent), n_steps, name=f"{family}-{kind}",
                       progress=progress, desc=f"{family}-{kind}")
    finally:
        env.close()


def generate_datasets(family: str, kinds: list[str], cfg: GenerateConfig, out_dir: Path,
                      seed: int, progress: bool = True) -> dict[str, Path]:
    """Write <out_dir>/<family>-<kind>.hdf5 for each kind; return {kind: path}.

    One online SAC run per family (checkpointed under <out_dir>/.sac/, resumable) gives the
    medium / medium-replay / expert policies; see the module docstring for the recipe.
    """
    family = family_of(family)
    unknown = sorted(set(kinds) - set(DATASET_KINDS))
    if unknown or not kinds:
        raise ConfigError(f"kinds: unknown dataset kind(s) {unknown or kinds}; "
                          f"known: {list(DATASET_KINDS)}")
    cfg.validate()
    out_dir = Path(out_dir)
    chash = config_hash(cfg)
    common = {"seed": seed, "config_hash": chash, "family": family, "git_sha": git_sha(),
              "generator": "datagen.generate"}
    paths: dict[str, Path] = {}

    def write(kind: str, dataset: Dataset, **attrs) -> None:
        scores = dataset.normalized_returns()
        # Recorded in the gym id's own model (make_env's default): the consistency check
        # confirms it replays there and records it as the file's sim_model.
        replay = consistency.check(dataset, models=task_spec(family).models[:1])
        paths[kind] = write_hdf5(dataset, out_dir / f"{family}-{kind}.hdf5", kind=kind,
                                 behaviour_normalized_return=float(scores.mean())
                                 if len(scores) else float("nan"), **common, **attrs,
                                 **consistency.attrs(replay))

    if "random" in kinds:
        write("random", random_dataset(family, cfg.n_transitions, _kind_seed(seed, "random"),
                                       progress=progress), sac_steps=0)
    policy_kinds = [k for k in kinds if k != "random"]
    if not policy_kinds:
        return paths

    need_expert = any(k in ("expert", "medium-expert") for k in policy_kinds)
    sac = OnlineSAC(family, cfg, seed, out_dir / ".sac" / f"{family}-seed{seed}-{chash}.pt")
    sac.run(need_expert=need_expert, progress=progress)

    def snap_attrs(snap: _Snapshot, target: float) -> dict:
        return {"sac_steps": snap.step, "policy_normalized_score": snap.score,
                "target_normalized_score": target, "target_reached": snap.reached}

    rollouts: dict[str, Dataset] = {}
    medium = sac.snapshot("medium")
    expert = sac.snapshot("expert") if need_expert else None
    for kind, snap, target in (("medium", medium, cfg.medium_target),
                               ("expert", expert, cfg.expert_target)):
        if kind in policy_kinds or ("medium-expert" in policy_kinds):
            rollouts[kind] = rollout_dataset(sac.actor(snap), family, kind, cfg.n_transitions,
                                             _kind_seed(seed, kind), progress=progress)
            if kind in policy_kinds:
                write(kind, rollouts[kind], **snap_attrs(snap, target))
    if "medium-replay" in policy_kinds:
        write("medium-replay", sac.replay.dataset(medium.step, f"{family}-medium-replay"),
              **snap_attrs(medium, cfg.medium_target))
    if "medium-expert" in policy_kinds:
        both = concatenate([rollouts["medium"], rollouts["expert"]], f"{family}-medium-expert")
        write("medium-expert", both, sac_steps=expert.step,
              policy_normalized_score=expert.score,
              target_reached=medium.reached and expert.reached)
    return {k: paths[k] for k in kinds}


@dataclass
class Maze2dGenerateConfig:
    """Local maze2d datasets: D4RL's waypoint-controller recipe (datagen/maze2d.py).
    Sizes: the generation script's default is 1M (generate_maze2d_datasets.py:45, `--num_samples`);
    1M / 2M / 4M are the sizes of D4RL's released umaze / medium / large -v1 files."""
    n_transitions: dict[str, int] = field(default_factory=lambda: {
        "umaze": 1_000_000, "medium": 2_000_000, "large": 4_000_000})
    # Gaussian std added to the controller's actions: the generation script's --noisy flag
    # (std 0.5) is off by default (generate_maze2d_datasets.py:43).
    action_noise: float = 0.0

    def validate(self) -> None:
        from harness.maze2d import MAZES
        unknown = sorted(set(self.n_transitions) - set(MAZES))
        require(not unknown, "n_transitions", f"unknown maze(s) {unknown}; known: {list(MAZES)}")
        require(all(n > 0 for n in self.n_transitions.values()), "n_transitions",
                f"must be positive, got {self.n_transitions}")
        require(self.action_noise >= 0, "action_noise", f"must be >= 0, got {self.action_noise}")


def generate_maze2d(kinds: list[str], cfg: Maze2dGenerateConfig, out_dir: Path, seed: int,
                    progress: bool = True) -> dict[str, Path]:
    """Write <out_dir>/maze2d-<kind>.hdf5 for each kind ('umaze', 'umaze-dense', ...). A maze's
    sparse and dense files share one stream (the same seed), as D4RL's dense files are its
    sparse ones relabelled (relabel_maze2d_rewards.py)."""
    from datagen.maze2d import maze2d_dataset
    cfg.validate()
    out_dir = Path(out_dir)
    paths = {}
    for kind in kinds:
        maze = kind.removesuffix("-dense")
        if maze not in cfg.n_transitions:
            raise ConfigError(f"data.maze2d.n_transitions: no size for maze {maze!r} "
                              f"(task maze2d-{kind})")
        task = f"maze2d-{kind}"
        dataset = maze2d_dataset(task, cfg.n_transitions[maze], seed=_maze_seed(seed, maze),
                                 progress=progress, action_noise=cfg.action_noise)
        replay = consistency.check(dataset, models=task_spec(task).models[:1])
        paths[kind] = write_hdf5(dataset, out_dir / f"{task}.hdf5", kind=kind, seed=seed,
                                 config_hash=config_hash(cfg), family="maze2d",
                                 git_sha=git_sha(), generator="datagen.maze2d",
                                 behaviour_normalized_return=float(
                                     dataset.normalized_returns().mean()),
                                 **consistency.attrs(replay))
    return paths


def _maze_seed(seed: int, maze: str) -> int:
    from harness.maze2d import MAZES
    return int(np.random.SeedSequence([seed, 100 + list(MAZES).index(maze)])
               .generate_state(1)[0])


def generate_step(spec: dict, log_fn=None) -> dict:
    """Job step: build a family's datasets and copy each kind to its place in the DAG."""
    import shutil
    from harness.checkpoint import atomic_path
    from harness.config import from_dict
    from harness.data import record
    from harness.data.d4rl import read_hdf5
    if spec["family"] == "maze2d":
        cfg = from_dict(Maze2dGenerateConfig, spec["config"]["maze2d"], where="data.maze2d")
        paths = generate_maze2d(spec["kinds"], cfg, Path(spec["out"]),
                                seed=spec["config"]["seed"], progress=True)
    else:
        cfg = from_dict(GenerateConfig, spec["config"]["generate"], where="data.generate")
        paths = generate_datasets(spec["family"], spec["kinds"], cfg, Path(spec["out"]),
                                  seed=spec["config"]["seed"], progress=True)
    summary, tags = {}, {}
    for kind, target in spec["outputs"].items():
        with atomic_path(target) as tmp:
            shutil.copyfile(paths[kind], tmp)
        info = read_hdf5(target).summary()
        summary[f"{kind}/behaviour_normalized_return"] = info["normalized_return_mean"]
        summary[f"{kind}/transitions"] = info["transitions"]
        # Its verdict and provenance next to it, for MLflow, the summary and the report.
        rec = record.from_file(target, f"{spec['family']}-{kind}", origin="generated")
        record.write_record(target, rec)
        tags.update({f"{kind}/{k}": v for k, v in record.mlflow_tags(rec).items()})
    return {**summary, "tags": tags}
