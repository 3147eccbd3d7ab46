"""MOPO (Yu et al. 2020) rollout generator: branched ensemble rollouts with a penalised reward.

Per `generate` call (MBPO / MOPO, as in OfflineRL-Kit's `rollout`): take the first
`rollout_batch_size` start states, then for h = 1..rollout_length
  a ~ pi(.|s)  (the SAC agent's stochastic action),
  one model step: every member predicts N(mean, std) of [next_obs, reward]; each sample uses one
  uniformly drawn elite member and a Gaussian draw from it,
  r~ = r_hat - lambda * u(s, a), with the uncertainty u:
    aleatoric     max over ALL members of ||std_e(s, a)||_2 (MOPO's `penalty_learned_var`),
    ensemble_std  ||std over members of mean_e(s, a)||_2 (disagreement of the members' means),
    none          0 (MBPO-style: the `mbpo` method in harness/registry.py),
  both norms over the full output [next_obs, reward], as in MOPO's and OfflineRL-Kit's code;
  done = termination_fn(task)(next_obs); samples that terminated are dropped from later steps.
Outputs are flat (M, ...) tensors in step-major order, plus scalar stats for the offline loop's
log (penalty_mean, raw_reward_mean, reward_mean, terminal_frac, mean_length).

The model's sampling noise comes from the generator's own torch.Generator, seeded from the job
seed, and saved/restored through state_dict/load_state_dict (the offline loop checkpoints it),
so a resumed policy run draws the same model noise as an uninterrupted one. The agent's action
noise uses the global torch RNG, which the offline loop checkpoints itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
import yaml

from harness.config import from_dict, require
from harness.data.dataset import Dataset
from harness.envs import termination_fn

PenaltyKind = Literal["aleatoric", "ensemble_std", "none"]

# MOPO's per-task settings (rollout length h, penalty coefficient lambda) as named presets, read
# from baselines/reference_settings.yaml (`mopo_presets`, each value with its source file):
#   "offlinerl-kit": OfflineRL-Kit's suggested values for the D4RL -v2 datasets
#       (run_example/run_mopo.py header), what config/paper.yaml runs: the tables compare MOPO
#       with OfflineRL-Kit's -v2 numbers. It lists no random dataset.
#   "mopo-authors": the MOPO authors' D4RL -v0 configs (github.com/tianheyu927/mopo,
#       examples/config/d4rl/<family>_<dataset>.py), for all 12 tasks.
#   "maze2d-choice": maze2d, which no source lists: our choice h = 5, lambda = 1 (the defaults
#       below, the MOPO authors' most common setting), named so no one reads it as a source's.
# GRID_PRESETS: the order the paper grid takes them in (the first that lists a task).
REFERENCE_SETTINGS = Path(__file__).with_name("reference_settings.yaml")
GRID_PRESETS = ("offlinerl-kit", "mopo-authors", "maze2d-choice")


def load_presets(path: Path = REFERENCE_SETTINGS) -> dict[str, dict[str, dict[str, float | int]]]:
    """{preset: {task: {"rollout_length", "penalty_coef"}}} from the reference settings file."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    out: dict[str, dict[str, dict[str, float | int]]] = {}
    for preset, tasks in (data.get("mopo_presets") or {}).items():
        for task, entry in tasks.items():
            missing = {"rollout_length", "penalty_coef", "source"} - set(entry)
            if missing:
                raise ValueError(f"{path}: mopo_presets.{preset}.{task}: missing "
                                 f"{sorted(missing)}")
            out.setdefault(preset, {})[task] = {k: entry[k] for k in ("rollout_length",
                                                                      "penalty_coef")}
    return out


PRESETS = load_presets()
PAPER_SETTINGS = PRESETS["mopo-authors"]  # the MOPO paper's own values (D4RL -v0)


@dataclass
class MOPOConfig:
    rollout_length: int = 5           # h (per task: PRESETS, config per_task)
    penalty_coef: float = 1.0         # lambda (per task: PRESETS, config per_task)
    penalty: PenaltyKind = "aleatoric"
    rollout_batch_size: int = 50_000  # start states per generate call (MOPO / OfflineRL-Kit)
    deterministic: bool = False       # True: the chosen elite's mean, no Gaussian draw

    def validate(self) -> None:
        require(self.rollout_length >= 1, "rollout_length",
                f"must be >= 1, got {self.rollout_length}")
        require(self.penalty_coef >= 0, "penalty_coef", f"must be >= 0, got {self.penalty_coef}")
        require(self.rollout_batch_size >= 1, "rollout_batch_size",
                f"must be >= 1, got {self.rollout_batch_size}")


def _task_key(task: str) -> str:
    key = task.lower()
    for suffix in ("-v0", "-v1", "-v2"):
        key = key.removesuffix(suffix)
    return key


def paper_settings(task: str, preset: str = "mopo-authors") -> dict[str, float | int]:
    """A preset's (rollout_length, penalty_coef) for a D4RL task name ('hopper-medium-v2' ok)."""
    if preset not in PRESETS:
        raise KeyError(f"unknown MOPO preset {preset!r}; known: {sorted(PRESETS)}")
    key = _task_key(task)
    if key not in PRESETS[preset]:
        raise KeyError(f"no {preset} MOPO settings for {task!r}; known: "
                       f"{sorted(PRESETS[preset])}")
    return dict(PRESETS[preset][key])


def grid_settings(task: str) -> tuple[str, dict[str, float | int]]:
    """(preset, settings) the paper grid uses for `task`: the first of GRID_PRESETS listing it."""
    for preset in GRID_PRESETS:
        if _task_key(task) in PRESETS[preset]:
            return preset, paper_settings(task, preset)
    raise KeyError(f"no MOPO settings for {task!r} in presets {list(GRID_PRESETS)}")


def uncertainty_penalty(means: torch.Tensor, stds: torch.Tensor,
                        kind: PenaltyKind) -> torch.Tensor:
    """u(s, a) per sample from every member's prediction: means, stds (E, N, D) -> (N,)."""
    if kind == "aleatoric":
        return stds.norm(dim=-1).amax(0)
    if kind == "ensemble_std":
        return means.std(0, unbiased=False).norm(dim=-1)
    if kind == "none":
        return torch.zeros(means.shape[1], device=means.device)
    raise ValueError(f"penalty must be 'aleatoric', 'ensemble_std' or 'none', got {kind!r}")


def _mix_seed(seed: int) -> int:
    # Keep the model-noise stream distinct from the global stream seeded with the same seed.
    return (int(seed) * 1_000_003 + 0x4D4F504F) % (2**63 - 1)


class EnsembleRolloutGenerator:
    """Branched rollouts of an `EnsembleDynamics` (MOPO; MBPO with penalty 'none')."""

    def __init__(self, dynamics, done_fn: Callable, cfg: MOPOConfig, seed: int = 0):
        self.dynamics, self.done_fn, self.cfg = dynamics, done_fn, cfg
        self.gen = torch.Generator(device=dynamics.device)
        self.gen.manual_seed(_mix_seed(seed))

    @property
    def rollout_batch_size(self) -> int:
        """Start states per call (the offline loop samples this many real states)."""
        return self.cfg.rollout_batch_size

    @property
    def max_transitions_per_call(self) -> int:
        return self.cfg.rollout_batch_size * self.cfg.rollout_length

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])

    @torch.no_grad()
    def generate(self, agent, start_obs: torch.Tensor) -> dict:
        cfg, dyn = self.cfg, self.dynamics
        obs = torch.as_tensor(start_obs, dtype=torch.float32, device=dyn.device)
        obs = obs[:cfg.rollout_batch_size]
        n_start = len(obs)
        keys = ("obs", "actions", "rewards", "next_obs", "terminals", "raw", "penalty")
        steps: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        for _ in range(cfg.rollout_length):  # sequential in time, batched over samples
            act = torch.as_tensor(agent.act(obs, deterministic=False), dtype=torch.float32,
                                  device=dyn.device)
            out = dyn.step(obs, act, self.gen, deterministic=cfg.deterministic)
            pen = uncertainty_penalty(out["means"], out["stds"], cfg.penalty)
            nxt = out["next_obs"]
            done = torch.as_tensor(self.done_fn(nxt), device=dyn.device).bool().reshape(-1)
            for k, v in zip(keys, (obs, act, out["rewards"] - cfg.penalty_coef * pen, nxt,
                                   done.float(), out["rewards"], pen)):
                steps[k].append(v)
            obs = nxt[~done]  # terminated samples stop here
            if len(obs) == 0:
                break
        flat = {k: torch.cat(v) for k, v in steps.items()}
        raw, pen = flat.pop("raw"), flat.pop("penalty")
        m = len(flat["obs"])
        flat.update(penalty_mean=float(pen.mean()) if m else 0.0,
                    raw_reward_mean=float(raw.mean()) if m else 0.0,
                    reward_mean=float(flat["rewards"].mean()) if m else 0.0,
                    terminal_frac=float(flat["terminals"].sum()) / max(n_start, 1),
                    mean_length=m / max(n_start, 1))
        return flat


def as_config(cfg: dict | MOPOConfig, where: str = "policy.rollout") -> MOPOConfig:
    return cfg if isinstance(cfg, MOPOConfig) else from_dict(MOPOConfig, cfg, where=where)


def make_generator(dataset: Dataset, cfg: dict | MOPOConfig, model_dirs: dict[str, Path],
                   device: torch.device | str = "cpu", seed: int | None = None
                   ) -> EnsembleRolloutGenerator:
    """MOPO generator from the trained ensemble in model_dirs['ensemble'].

    seed: of the model-noise stream; default torch.initial_seed(), i.e. the job seed that
    train_policy passed to seed_everything just before building the generator.
    """
    cfg = as_config(cfg)
    if "ensemble" not in model_dirs:
        raise KeyError(f"MOPO/MBPO rollouts need a trained model 'ensemble' in model_dirs "
                       f"(got {sorted(model_dirs)})")
    from baselines.ensemble import load_ensemble
    dyn = load_ensemble(model_dirs["ensemble"], device)
    if dyn.obs_dim != dataset.obs_dim or dyn.act_dim != dataset.act_dim:
        raise ValueError(f"ensemble at {model_dirs['ensemble']} has obs/act dims "
                         f"{dyn.obs_dim}/{dyn.act_dim}, dataset {dataset.name} has "
                         f"{dataset.obs_dim}/{dataset.act_dim}")
    seed = torch.initial_seed() if seed is None else seed
    return EnsembleRolloutGenerator(dyn, termination_fn(dataset.name), cfg, seed)


__all__ = ["MOPOConfig", "PAPER_SETTINGS", "PRESETS", "GRID_PRESETS", "EnsembleRolloutGenerator",
           "make_generator", "grid_settings", "paper_settings", "uncertainty_penalty"]
