"""Dynamics-consistency check: which simulator model replays a dataset's transitions?

For a random sample of rows that do not end an episode, the simulator is put in the row's stored
state (qpos, qvel) and stepped with the row's action exactly as the env steps (the env's own
`step`: frame_skip substeps of the model's timestep); the observation it returns is compared
with the stored next observation (both leave out the x position). A row's error is the max-abs
difference over the observation; a model is judged by two statistics of its row errors, the
residual (a high quantile, 0.999) and the median.

The verdict has three outcomes, from numbers measured per family (docs/physics-drift.md,
scripts/measure_release_drift.py: data recorded in every installable MuJoCo release from 2.3.1
to today's, and in deliberately wrong models):

- "matches": residual <= `tolerance` (1e-2) and median <= `median_tolerance` (1e-5): the model
  replays the data to the float32 rounding of its states, as data recorded in today's release
  does (<= 2.6e-5 at the 0.999 quantile, median <= 5e-7; the max can reach 0.3 on walker2d
  where rounding decides a contact, hence a quantile).
- "matches up to release drift": within the family's `release_drift` bounds, above what data
  recorded in another MuJoCo release measures in today's (hopper up to 0.19 at the 0.999
  quantile, median 7e-3, recorded in 2.3.1 - 3.4.0; the maze's walls up to 0.72, median 1e-7;
  from 3.5.0 on both replay as today's own data) and below what a wrong model gives
  (walker2d's other foot friction >= 1.4, hopper's foot friction 2.0 -> 1.0: 0.95,
  halfcheetah's friction or mass: >= 0.98; the maze's damping or mass x1.1: median >= 3e-4),
  and `model_ratio` below every other candidate. Accepted with a warning; the report, the
  file's attrs and MLflow record it, and the recording's MuJoCo release (a file attr, or
  `recorded_with`) when known.
- "wrong model": beyond those bounds, two candidates within `model_ratio` of each other while
  beyond `tolerance` (drift blurs what tells them apart), or beyond the tolerances for data
  recorded in the very release replaying it (no drift to allow): refused with every model's
  residuals and the key `data.consistency.accept_mismatch`.

What the bounds cannot tell: a 10 % heavier hopper torso (0.039 at the 0.999 quantile in
today's release) is below hopper's release drift, so hopper data from an older release is
accepted whether or not its torso mass is right; MuJoCo 2.0 (D4RL's -v2 files, via mujoco-py)
cannot be installed here and its drift is not measured.

Every sampled row counts, in each candidate model: where the stored state (qpos, qvel) gives
the stored observation there (D4RL's own test, scripts/check_mujoco_datasets.py
check_qpos_qvel: squared error < 1e-8) its error is the replayed next observation's; where it
does not, its error is that observation mismatch itself, evidence against the model (another
robot with the same widths, states from another step), never a reason to skip the check.
Only rows whose velocity sits exactly on the observation's clip bound are left out (D4RL's
scripts/generation/mujoco/fix_qpos_qvel.py rebuilt the -v2 files' qvel from the clipped
observation, which loses every velocity beyond the bound). A file without qpos/qvel cannot be
replayed: "not checked (no qpos/qvel)", a warning, recorded with the data.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field

import numpy as np

from harness.config import require
from harness.data.dataset import Dataset, DatasetError
from harness.envs import FAMILIES, make_env, restore_state, task_spec

log = logging.getLogger(__name__)

CONFIG_KEY = "data.consistency"
# D4RL's check_qpos_qvel bound on sum((obs - obs(qpos, qvel))**2) (check_mujoco_datasets.py).
STATE_OBS_SQ_ERROR = 1e-8


class ConsistencyError(DatasetError):
    """No candidate simulator model replays the dataset within the family's bounds."""


MATCHES, DRIFT, WRONG, ACCEPTED = ("matches", "matches up to release drift", "wrong model",
                                   "wrong model accepted")


@dataclass
class DriftBound:
    """The most a family's data recorded in another MuJoCo release may miss by in today's."""
    residual: float   # bound on the residual (the `quantile` of per-row errors)
    median: float     # bound on the median per-row error


# Per family: above the release drift measured there and below the mismatch gap
# (docs/physics-drift.md). walker2d and halfcheetah measured no drift (2.3.1 .. 4.0 replay as
# today's own data); their bounds leave room for MuJoCo 2.0's, at hopper's measured size,
# and stay >= 3x below their smallest measured mismatch (0.6, 0.98).
RELEASE_DRIFT = {"hopper": (0.4, 2e-2), "walker2d": (0.2, 2e-2), "halfcheetah": (0.3, 2e-2),
                 "maze2d": (1.5, 1e-5)}


@dataclass
class ConsistencyConfig:
    """`data.consistency`: how imported datasets are checked against the simulator
    (module docstring: the three verdicts and the measurements behind each number)."""
    tolerance: float = 1e-2         # "matches": residual bound, every family
    median_tolerance: float = 1e-5  # "matches": median bound, every family
    quantile: float = 0.999         # which quantile of per-row errors is the residual
    release_drift: dict[str, DriftBound] = field(default_factory=lambda: {
        f: DriftBound(r, m) for f, (r, m) in RELEASE_DRIFT.items()})
    model_ratio: float = 4.0        # the chosen model's residual this many times below the next
    recorded_with: str | None = None  # the MuJoCo release the data was recorded in, if known
    rows: int = 2000                # rows sampled (without replacement) for the replay
    accept_mismatch: bool = False   # import even a wrong model (the best one)
    seed: int = 0                   # row sample

    def __post_init__(self) -> None:  # a partial release_drift keeps the other families'
        given = self.release_drift or {}
        self.release_drift = {**{f: DriftBound(r, m) for f, (r, m) in RELEASE_DRIFT.items()},
                              **given}

    def validate(self) -> None:
        require(self.tolerance > 0, "tolerance", f"must be positive, got {self.tolerance}")
        require(self.median_tolerance > 0, "median_tolerance",
                f"must be positive, got {self.median_tolerance}")
        require(0.5 <= self.quantile <= 1.0, "quantile",
                f"must be in [0.5, 1], got {self.quantile}")
        require(self.rows > 0, "rows", f"must be positive, got {self.rows}")
        require(self.model_ratio >= 1, "model_ratio", f"must be >= 1, got {self.model_ratio}")
        for family, b in self.release_drift.items():
            require(family in FAMILIES, f"release_drift.{family}",
                    f"unknown task family; known: {sorted(FAMILIES)}")
            require(b.residual >= self.tolerance, f"release_drift.{family}.residual",
                    f"must be >= tolerance ({self.tolerance:g}), got {b.residual:g}")
            require(b.median >= self.median_tolerance, f"release_drift.{family}.median",
                    f"must be >= median_tolerance ({self.median_tolerance:g}), "
                    f"got {b.median:g}")
        require(self.recorded_with is None or bool(self.recorded_with.strip()),
                "recorded_with", "must name a MuJoCo release (e.g. '2.0'), got ''")

    def drift_bound(self, family: str) -> DriftBound:
        return self.release_drift.get(family, DriftBound(self.tolerance, self.median_tolerance))


def sample_rows(dataset: Dataset, n: int, seed: int) -> np.ndarray:
    """Up to n sorted row indices, none an episode end (the next row may follow a reset)."""
    candidates = np.flatnonzero(~dataset.episode_ends())
    if len(candidates) > n:
        candidates = np.sort(np.random.default_rng(seed).choice(candidates, n, replace=False))
    return candidates


def clip_bound_rows(dataset: Dataset, rows: np.ndarray) -> np.ndarray:
    """Boolean per row: some stored velocity sits exactly on the observation's clip bound
    (D4RL's fix_qpos_qvel.py rebuilt such qvel from the clipped observation: the state no
    longer stands for the transition, whatever the model)."""
    clip = task_spec(dataset.name).qvel_clip
    if clip is None:
        return np.zeros(len(rows), dtype=bool)
    return (np.abs(dataset.qvel[rows]) == clip).any(-1)


def state_errors(dataset: Dataset, rows: np.ndarray, model: str) -> tuple[np.ndarray, np.ndarray]:
    """Per row, in `model`: the max-abs difference between the observation the stored state
    (qpos, qvel) gives and the stored observation, and whether it passes D4RL's own test
    (check_qpos_qvel: squared error < 1e-8)."""
    env = make_env(dataset.name, model=model)
    errors, passes = np.empty(len(rows)), np.empty(len(rows), dtype=bool)
    try:
        for n, i in enumerate(rows):
            diff = restore_state(env, dataset.qpos[i], dataset.qvel[i]) \
                - dataset.observations[i].astype(np.float64)
            errors[n], passes[n] = np.abs(diff).max(), float(np.sum(diff ** 2)) < STATE_OBS_SQ_ERROR
    finally:
        env.close()
    return errors, passes


def row_errors(dataset: Dataset, rows: np.ndarray, model: str) -> tuple[np.ndarray, int]:
    """Each row's error in `model` and how many rows' stored state does not give their
    stored observation there. A row whose state gives its observation is replayed (the error
    of the simulated next observation); one whose state does not is evidence against the model
    in itself: its error is that observation mismatch (its replay would start elsewhere)."""
    errors, passes = state_errors(dataset, rows, model)
    errors[passes] = replay_errors(dataset, rows[passes], model)
    return errors, int((~passes).sum())


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
    """residual, median, max of the row errors. The residual never rests on the single worst
    row (with float32 states one contact in thousands can start or not within rounding): at
    most the second largest error, as the 0.999 quantile of 2000 rows is; in a small file the
    quantile would otherwise be its max."""
    n = len(errors)
    q = min(quantile, (n - 2) / (n - 1)) if n > 2 else quantile
    return {"residual": float(np.quantile(errors, q)), "median": float(np.median(errors)),
            "max": float(errors.max())}


def _within(stats: dict, residual: float, median: float) -> bool:
    return stats["residual"] <= residual and stats["median"] <= median


def verdict(residuals: dict[str, dict], family: str, cfg: ConsistencyConfig,
            same_release: bool = False) -> tuple[str, str, str]:
    """(outcome, chosen model, reason) from every candidate's statistics (in the task's order:
    ties go to the first). The smallest residual is chosen; it "matches" within tolerance, or
    "matches up to release drift" within the family's bounds if it is also `model_ratio`
    below every other candidate; else "wrong model". `same_release`: the data was recorded in
    the release replaying it, so there is no release drift to allow for."""
    models = list(residuals)
    best = min(models, key=lambda m: residuals[m]["residual"])
    stats = residuals[best]
    if _within(stats, cfg.tolerance, cfg.median_tolerance):
        return MATCHES, best, ""
    if same_release:
        return WRONG, best, (f"beyond {CONFIG_KEY}.tolerance={cfg.tolerance:g} / "
                             f"median_tolerance={cfg.median_tolerance:g}, and recorded in the "
                             f"release replaying it: no release drift to allow for")
    bound = cfg.drift_bound(family)
    if not _within(stats, bound.residual, bound.median):
        return WRONG, best, (f"beyond {family}'s release drift ({CONFIG_KEY}.release_drift."
                             f"{family}: residual <= {bound.residual:g}, median <= "
                             f"{bound.median:g})")
    close = [m for m in models if m != best
             and residuals[m]["residual"] < cfg.model_ratio * stats["residual"]]
    if close:
        return WRONG, best, (f"{best} is not {CONFIG_KEY}.model_ratio={cfg.model_ratio:g}x "
                             f"below {', '.join(close)}: the drift blurs which model it is")
    return DRIFT, best, ""


def _listing(residuals: dict) -> str:
    return ", ".join(
        f"{m} {r['residual']:.3g} (median {r['median']:.2g}"
        + (f"; its stored states give another observation in {r['state_mismatch']} of "
           f"{r['rows']} rows" if r.get("state_mismatch") else "") + ")"
        for m, r in residuals.items())


NO_STATES = "not checked (no qpos/qvel)"


def check(dataset: Dataset, cfg: ConsistencyConfig | None = None,
          models: tuple[str, ...] | None = None) -> dict:
    """Replay a sample of `dataset` in each candidate model (default: the task's models) and
    return the report: status (the verdict), sim_model (the chosen one), per-model
    residual/median/max and how many rows' stored state does not give the stored observation
    there (`state_mismatch`, counted into the row errors: `row_errors`), the recording's MuJoCo
    release if known, the settings. Raises ConsistencyError on a wrong model unless
    cfg.accept_mismatch; warns on release drift. A dataset without qpos/qvel is reported "not
    checked" with the task's default model (a warning, not an error): nothing can be
    replayed."""
    cfg = cfg or ConsistencyConfig()
    spec = task_spec(dataset.name)
    models = tuple(models or spec.models)
    where = dataset.source or dataset.name
    recorded = cfg.recorded_with or dataset.extra.get("recorded_mujoco")
    report = {"sim_model": models[0], "models": list(models), **asdict(cfg), "rows_used": 0,
              "recorded_mujoco": recorded or "unknown", "replayed_mujoco": mujoco_version()}
    if not dataset.has_states:
        log.warning("%s: dynamics-consistency check not run: the dataset has no qpos/qvel; "
                    "evaluating in %s", where, models[0])
        return {**report, "status": NO_STATES}
    sampled = sample_rows(dataset, cfg.rows, cfg.seed)
    on_bound = clip_bound_rows(dataset, sampled)
    rows = sampled[~on_bound]
    report.update(rows_sampled=len(sampled), rows_used=len(rows),
                  left_out={"qvel_on_clip_bound": int(on_bound.sum())})
    if len(rows) == 0:  # every velocity rebuilt from a clipped observation: nothing stands
        message = (f"{where}: key 'infos/qvel': each of the {len(sampled)} sampled rows has a "
                   f"velocity on the observation's clip bound ({spec.qvel_clip:g}), so no "
                   f"stored state stands for its transition and no model can be checked; set "
                   f"{CONFIG_KEY}.accept_mismatch: true to import it unchecked (evaluated in "
                   f"{models[0]})")
        return _refuse_unless_accepted(message, cfg, report)
    residuals = {}
    for m in models:
        errors, mismatched = row_errors(dataset, rows, m)
        residuals[m] = {**_stats(errors, cfg.quantile), "rows": len(rows),
                        "state_mismatch": mismatched}
    outcome, best, reason = verdict(residuals, spec.family, cfg,
                                    same_release=recorded == mujoco_version())
    report.update(sim_model=best, residuals=residuals, residual=residuals[best]["residual"])
    release = f"recorded in MuJoCo {recorded}" if recorded else "recording release unknown"
    if outcome == MATCHES:
        return {**report, "status": MATCHES}
    if outcome == DRIFT:
        log.warning("%s: %s replays the data only up to MuJoCo release drift (%s, replayed in "
                    "%s: residual %.3g, median %.2g; %s.tolerance=%g): accepted, recorded as "
                    "'%s'", where, best, release, mujoco_version(),
                    residuals[best]["residual"], residuals[best]["median"], CONFIG_KEY,
                    cfg.tolerance, DRIFT)
        return {**report, "status": DRIFT}
    message = (f"{where}: wrong simulator model: no candidate explains the data ({reason}; "
               f"residual = {cfg.quantile:g} quantile of per-row max-abs error over "
               f"{len(rows)} rows, the next observation replayed where the stored state gives "
               f"the stored observation and that observation's own mismatch where it does "
               f"not, {release}, replayed in MuJoCo {mujoco_version()}: "
               f"{_listing(residuals)}); set {CONFIG_KEY}.accept_mismatch: true to import it "
               f"anyway (evaluated in {best})")
    return _refuse_unless_accepted(message, cfg, report)


def _refuse_unless_accepted(message: str, cfg, report: dict) -> dict:
    """A file no candidate explains: refused in one line, unless data.consistency.
    accept_mismatch lets it through (recorded as accepted, with the same line as a warning)."""
    if not cfg.accept_mismatch:
        raise ConsistencyError(message)
    log.warning("%s (accepted)", message)
    return {**report, "status": ACCEPTED}


def mujoco_version() -> str:
    import mujoco
    return mujoco.__version__


def attrs(report: dict) -> dict:
    """hdf5 attrs recording the check: the chosen model, the verdict, the residual, the
    recording's MuJoCo release when known, the whole report."""
    out = {"sim_model": report["sim_model"], "consistency_status": report["status"],
           "consistency_residual": float(report.get("residual", float("nan"))),
           "consistency": json.dumps(report, sort_keys=True)}
    if report.get("recorded_mujoco") not in (None, "unknown"):
        out["recorded_mujoco"] = report["recorded_mujoco"]
    return out


def metrics(report: dict) -> dict:
    """Numbers for MLflow (final/<key>): the chosen model's residual and every model's."""
    out = {"consistency_rows": report["rows_used"]}
    for model, stats in (report.get("residuals") or {}).items():
        out.update({f"consistency_{stat}/{model}": v for stat, v in stats.items()})
    if "residual" in report:
        out["consistency_residual"] = report["residual"]
    return out
