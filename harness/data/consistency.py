"""Dynamics-consistency check: which simulator model replays a dataset's transitions?

For a random sample of rows that do not end an episode, the simulator is put in the row's stored
state (qpos, qvel) and stepped with the row's action exactly as the env steps (the env's own
`step`: frame_skip substeps of the model's timestep); the observation it returns is compared
with the stored next observation (both leave out the x position). A row's error is the max-abs
difference over the observation; a model's residual is a high quantile of the row errors.
Every candidate model of the task (`TaskSpec.models`) is replayed, the one with the smallest
residual is chosen, and the import stops if even that one exceeds the tolerance.

Why a high quantile and not the median: a wrong walker2d model differs only in the right foot's
friction, so rows without that foot in contact replay exactly in both models (median ~0) while
contact rows are off by O(1). Why not the max: with states stored in float32 (D4RL's files), a
contact that starts or not within rounding of the state can make one row in thousands miss even
in the right model. Measured on generated walker2d data (docs/architecture.md, Data): right
model <= 2e-5 at the 99.9 % quantile with float32 states, wrong model >= 1.7.

Rows whose stored state cannot stand for the transition are left out: the restored observation
must reproduce the stored one (D4RL's own test, scripts/check_mujoco_datasets.py
check_qpos_qvel: squared error < 1e-8), and no velocity may sit exactly on the observation's
clip bound (D4RL's scripts/generation/mujoco/fix_qpos_qvel.py rebuilt the -v2 files' qvel
from the clipped observation, which loses every velocity beyond the bound).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

import numpy as np

from harness.config import require
from harness.data.dataset import Dataset, DatasetError
from harness.envs import make_env, restore_state, task_spec

log = logging.getLogger(__name__)

CONFIG_KEY = "data.consistency"
# D4RL's check_qpos_qvel bound on sum((obs - obs(qpos, qvel))**2) (check_mujoco_datasets.py).
STATE_OBS_SQ_ERROR = 1e-8
# If more sampled rows than this fraction have a state that does not give their observation,
# the file's states are not the ones its transitions were recorded from: no model is judged.
MAX_MISMATCHED_STATES = 0.5


class ConsistencyError(DatasetError):
    """No candidate simulator model replays the dataset within the tolerance."""


@dataclass
class ConsistencyConfig:
    """`data.consistency`: how imported datasets are checked against the simulator.

    tolerance 1e-2 sits between numerical drift and a model mismatch (measured on walker2d,
    docs/architecture.md): float32-rounded states replay to <= 2e-5 in the right model, a wrong
    friction gives >= 1.7, so the bound is ~500x above the one and ~170x below the other,
    leaving room for what MuJoCo 2.0 (D4RL, via mujoco-py) vs 3.x may add."""
    tolerance: float = 1e-2        # max allowed residual (the quantile below) of the best model
    quantile: float = 0.999        # which quantile of per-row errors is the residual
    rows: int = 2000               # rows sampled (without replacement) for the replay
    accept_mismatch: bool = False  # import even if the best model exceeds the tolerance
    seed: int = 0                  # row sample

    def validate(self) -> None:
        require(self.tolerance > 0, "tolerance", f"must be positive, got {self.tolerance}")
        require(0.5 <= self.quantile <= 1.0, "quantile",
                f"must be in [0.5, 1], got {self.quantile}")
        require(self.rows > 0, "rows", f"must be positive, got {self.rows}")


def sample_rows(dataset: Dataset, n: int, seed: int) -> np.ndarray:
    """Up to n sorted row indices, none an episode end (the next row may follow a reset)."""
    candidates = np.flatnonzero(~dataset.episode_ends())
    if len(candidates) > n:
        candidates = np.sort(np.random.default_rng(seed).choice(candidates, n, replace=False))
    return candidates


def usable_rows(dataset: Dataset, rows: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """The rows whose stored state reproduces the stored observation and has no velocity on
    the observation's clip bound; plus how many were left out for each reason."""
    spec = task_spec(dataset.name)
    env = make_env(dataset.name)  # observations do not depend on the model's friction
    ok_obs = np.empty(len(rows), dtype=bool)
    try:
        for n, i in enumerate(rows):
            obs = restore_state(env, dataset.qpos[i], dataset.qvel[i])
            diff = obs - dataset.observations[i].astype(np.float64)
            ok_obs[n] = float(np.sum(diff ** 2)) < STATE_OBS_SQ_ERROR
    finally:
        env.close()
    on_bound = np.zeros(len(rows), dtype=bool)
    if spec.qvel_clip is not None:
        on_bound = (np.abs(dataset.qvel[rows]) == spec.qvel_clip).any(-1)
    keep = ok_obs & ~on_bound
    return rows[keep], {"state_does_not_reproduce_obs": int((~ok_obs).sum()),
                        "qvel_on_clip_bound": int((ok_obs & on_bound).sum())}


def replay_errors(dataset: Dataset, rows: np.ndarray, model: str) -> np.ndarray:
    """Per-row max-abs error of the simulated next observation (float64) under `model`."""
    env = make_env(dataset.name, model=model)
    env.reset(seed=0)
    base = env.unwrapped
    errors = np.empty(len(rows))
    try:
        for n, i in enumerate(rows):
            # No solver warm start: a replayed step is a function of (qpos, qvel, action) only.
            base.data.qacc_warmstart[:] = 0.0
            restore_state(env, dataset.qpos[i], dataset.qvel[i])
            next_obs = base.step(dataset.actions[i].astype(np.float64))[0]
            errors[n] = np.abs(next_obs - dataset.next_observations[i].astype(np.float64)).max()
    finally:
        env.close()
    return errors


def _stats(errors: np.ndarray, quantile: float) -> dict[str, float]:
    return {"residual": float(np.quantile(errors, quantile)), "median": float(np.median(errors)),
            "max": float(errors.max())}


def check(dataset: Dataset, cfg: ConsistencyConfig | None = None,
          models: tuple[str, ...] | None = None) -> dict:
    """Replay a sample of `dataset` in each candidate model (default: the task's models) and
    return the report: status, sim_model (the chosen one), per-model residual/median/max, the
    settings. Raises ConsistencyError when even the best model exceeds cfg.tolerance, unless
    cfg.accept_mismatch. Datasets without usable qpos/qvel are reported "not checked" with
    the task's default model (a warning, not an error)."""
    cfg = cfg or ConsistencyConfig()
    spec = task_spec(dataset.name)
    models = tuple(models or spec.models)
    where = dataset.source or dataset.name
    report = {"sim_model": models[0], "models": list(models), **asdict(cfg), "rows_used": 0}
    if not dataset.has_states:
        log.warning("%s: dynamics-consistency check not run: the dataset has no qpos/qvel; "
                    "evaluating in %s", where, models[0])
        return {**report, "status": "not checked (no qpos/qvel)"}
    sampled = sample_rows(dataset, cfg.rows, cfg.seed)
    rows, left_out = usable_rows(dataset, sampled)
    report.update(rows_sampled=len(sampled), rows_used=len(rows), left_out=left_out)
    if len(rows) == 0 or left_out["state_does_not_reproduce_obs"] > MAX_MISMATCHED_STATES \
            * len(sampled):
        log.warning("%s: dynamics-consistency check not run: %d of %d sampled rows are usable "
                    "(left out: %s); evaluating in %s", where, len(rows), len(sampled),
                    left_out, models[0])
        return {**report, "status": "not checked (qpos/qvel do not reproduce observations)"}
    residuals = {m: _stats(replay_errors(dataset, rows, m), cfg.quantile) for m in models}
    best = min(models, key=lambda m: residuals[m]["residual"])  # ties: the task's order
    report.update(sim_model=best, residuals=residuals, residual=residuals[best]["residual"])
    if residuals[best]["residual"] <= cfg.tolerance:
        return {**report, "status": "checked"}
    listing = ", ".join(f"{m} {r['residual']:.3g}" for m, r in residuals.items())
    message = (f"{where}: no simulator model replays the data within {CONFIG_KEY}.tolerance="
               f"{cfg.tolerance:g} (residual = {cfg.quantile:g} quantile of per-row max-abs "
               f"next-observation error over {len(rows)} rows: {listing}); set "
               f"{CONFIG_KEY}.accept_mismatch: true to import it anyway (evaluated in {best})")
    if not cfg.accept_mismatch:
        raise ConsistencyError(message)
    log.warning("%s (accepted)", message)
    return {**report, "status": "mismatch accepted"}


def attrs(report: dict) -> dict:
    """hdf5 attrs recording the check: the chosen model, the residual, the whole report."""
    return {"sim_model": report["sim_model"], "consistency_status": report["status"],
            "consistency_residual": float(report.get("residual", float("nan"))),
            "consistency": json.dumps(report, sort_keys=True)}


def metrics(report: dict) -> dict:
    """Numbers for MLflow (final/<key>): the chosen model's residual and every model's."""
    out = {"consistency_rows": report["rows_used"]}
    for model, stats in (report.get("residuals") or {}).items():
        out.update({f"consistency_{stat}/{model}": v for stat, v in stats.items()})
    if "residual" in report:
        out["consistency_residual"] = report["residual"]
    return out
