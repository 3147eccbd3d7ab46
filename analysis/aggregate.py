"""rliable aggregates (Agarwal et al. 2021) of the policies' final D4RL normalised scores.

Scale: scores stay on D4RL's 0-100 scale everywhere (100 = D4RL expert), so IQM/mean/median
read like the numbers in the papers' tables; the optimality gap therefore uses gamma = 100
(rliable's gamma = 1 on its 0-1 scale) and performance-profile thresholds tau are in the same
units.

Statistics: stratified bootstrap over runs (seeds) within each task, percentile 95 % CIs,
`reps` replications (2,000 for smoke runs, 50,000 as in the rliable paper). By default one
vectorised bootstrap per method computes every metric from the same index arrays, drawn by a
numpy Generator seeded from `seed`; `engine="rliable"` runs rliable's own per-replicate loop
(numpy's global RNG, re-seeded from `seed`). Either way the same inputs and seed give the same
CIs, and the point estimates are rliable's functions on the data.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from rliable import library as rly
from rliable import metrics, plot_utils

from analysis import plotting
from harness import registry, tracking
from harness.checkpoint import atomic_write_text

log = logging.getLogger("dydiff.analysis")

SCORE_FILE = "eval.json"
SCORE_KEYS = ("method", "task", "seed", "normalized_score")
METRIC_NAMES = ("IQM", "Mean", "Median", "Optimality Gap")
OPTIMALITY_GAMMA = 100.0  # 0-100 scale: the gap below a D4RL expert


class ScoreError(ValueError):
    """A score file is missing or malformed; the message names the file and key."""


# ---- inputs ------------------------------------------------------------------------------

# `analysis.score_rule`: which number of a run's eval.json is its score, and how a table
# names it next to the published columns' rules (published.yaml score_rule).
SCORE_RULES = {
    "final": ("normalized_score", "final eval"),              # CORL's "last"
    "last10": ("normalized_score_last10", "mean of last 10 evals"),  # OfflineRL-Kit's
    # Diffusion-QL's published numbers (--ms online): the max over the training evaluations;
    # their cadence (how many, how many episodes, shared start states) differs from the
    # sources': README "Evaluation cadence under the `best` score rule"
    "best": ("normalized_score_best", "best eval during training"),
}


def collect_scores(paths, rule: str = "final") -> pd.DataFrame:
    """Read the final evaluations (`eval.json`, what the DAG's evaluate step writes) into one
    row per run: method, task, seed, normalized_score (0-100), the number `rule` names
    (SCORE_RULES). A directory is searched recursively for eval.json. Rows already read (a
    DataFrame, e.g. `scores_from_mlflow`) are checked and ordered the same way."""
    if rule not in SCORE_RULES:
        raise ScoreError(f"analysis.score_rule: {rule!r} is not one of {list(SCORE_RULES)}")
    key = SCORE_RULES[rule][0]
    if isinstance(paths, pd.DataFrame):  # the rule picked its number already
        return _score_table(paths.to_dict("records"))
    files: list[Path] = []
    for p in map(Path, paths):
        files.extend(sorted(p.rglob(SCORE_FILE)) if p.is_dir() else [p])
    if not files:
        raise ScoreError(f"no score files found in {[str(p) for p in paths]}")
    rows = []
    for f in files:
        try:
            data = json.loads(Path(f).read_text())
        except FileNotFoundError:
            raise ScoreError(f"score file {f} does not exist") from None
        except json.JSONDecodeError as err:
            raise ScoreError(f"score file {f} is not valid JSON: {err}") from None
        missing = [k for k in (*SCORE_KEYS, key) if k not in data]
        if missing:
            raise ScoreError(f"score file {f} lacks key(s) {sorted(set(missing))}"
                             + (f" (analysis.score_rule: {rule})" if key in missing else ""))
        score = data[key]
        if not isinstance(score, (int, float)) or not np.isfinite(score):
            raise ScoreError(f"score file {f}: {key!r} must be a finite number, "
                             f"got {score!r}")
        rows.append({"method": str(data["method"]), "task": str(data["task"]),
                     "seed": int(data["seed"]), "normalized_score": float(score),
                     "source": str(f), **environment_from_eval(data)})
    return _score_table(rows)


# ---- what produced each run --------------------------------------------------------------
# eval.json's "environment" object (harness.provenance: python, packages {name: version},
# torch_cuda, packages_digest) and "device"; MLflow carries the same as tags env.<name>. A
# run without them (an older eval.json) reads "unrecorded". `dataset_mujoco`: the MuJoCo
# release the run's dataset was recorded in (its hdf5 attrs, harness.data.consistency).

UNRECORDED = "unrecorded"
CPU_BUILD = "none (CPU build)"  # torch_cuda of a CPU torch
ENV_COLUMNS = ("python", "mujoco", "torch", "torch_cuda", "gymnasium", "gymnasium-robotics",
               "numpy", "packages_digest", "device", "dataset_mujoco")
ENV_PACKAGES = ("mujoco", "torch", "gymnasium", "gymnasium-robotics", "numpy")


def _text(value) -> str:
    if value is None or value == "":
        return UNRECORDED
    return str(value)


def _device_text(device) -> str:
    """A short name of the eval.json "device" object (its name, else its type)."""
    if isinstance(device, dict):
        return _text(device.get("name") or device.get("type") or (
            json.dumps(device, sort_keys=True) if device else None))
    return _text(device)


def environment_from_eval(data: dict) -> dict:
    """ENV_COLUMNS of one eval.json ("unrecorded" where a key is absent)."""
    env = data.get("environment") if isinstance(data.get("environment"), dict) else {}
    packages = env.get("packages") if isinstance(env.get("packages"), dict) else {}
    out = {"python": _text(env.get("python")),
           "torch_cuda": _text(env.get("torch_cuda")) if env else UNRECORDED,
           "packages_digest": _text(env.get("packages_digest")),
           "device": _device_text(data.get("device")),
           "dataset_mujoco": _text(data.get("dataset_mujoco"))}
    if env and env.get("torch_cuda") is None:
        out["torch_cuda"] = CPU_BUILD
    out.update({name: _text(packages.get(name)) for name in ENV_PACKAGES})
    return {k: out[k] for k in ENV_COLUMNS}


def environment_from_tags(tags: dict) -> dict:
    """ENV_COLUMNS of one MLflow run's tags (env.mujoco, env.torch, env.packages_digest, ...;
    dataset.mujoco)."""
    out = {name: _text(tags.get(f"env.{name}")) for name in ENV_COLUMNS
           if name not in ("device", "dataset_mujoco", "torch_cuda")}
    cuda = tags.get("env.torch_cuda")
    out["torch_cuda"] = (UNRECORDED if cuda is None and "env.torch" not in tags else
                         CPU_BUILD if str(cuda).lower() in ("", "none", "null") else str(cuda))
    out["device"] = _text(tags.get("env.device") or tags.get("device"))
    out["dataset_mujoco"] = _text(tags.get("dataset.mujoco"))
    return {k: out[k] for k in ENV_COLUMNS}


def environment_counts(df: pd.DataFrame, column: str) -> dict[str, int]:
    """{value: runs} of one ENV_COLUMNS column, most runs first ("unrecorded" counted too)."""
    if column not in df:
        return {UNRECORDED: len(df)} if len(df) else {}
    counts = df[column].fillna(UNRECORDED).astype(str).value_counts()
    return {str(k): int(v) for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))}


def _listing(counts: dict[str, int], what: str) -> str:
    return ", ".join(f"{k if k == UNRECORDED else what + k} ({n} run{'s' if n != 1 else ''})"
                     for k, n in counts.items())


def environment_notes(df: pd.DataFrame) -> list[str]:
    """Warnings when the runs combined here come from different environments: MuJoCo
    releases first (physics moves between them), then torch, Python, the package digest."""
    notes = []
    mujoco = environment_counts(df, "mujoco")
    if len(mujoco) > 1:
        notes.append(f"the runs combined here were evaluated in {len(mujoco)} different MuJoCo "
                     f"releases: {_listing(mujoco, 'MuJoCo ')}; physics differs between "
                     f"releases, so their scores are not strictly comparable")
    for column, what in (("torch", "torch "), ("python", "Python ")):
        counts = environment_counts(df, column)
        if len(counts) > 1:
            notes.append(f"the runs come from {len(counts)} {what.strip()} versions: "
                         f"{_listing(counts, what)}")
    digests = environment_counts(df, "packages_digest")
    if len(digests) > 1:
        short = {(k[:12] if k != UNRECORDED else k): n for k, n in digests.items()}
        notes.append(f"the runs come from {len(digests)} different installed package sets "
                     f"(packages_digest): {_listing(short, '')}")
    return notes


PUBLISHED_PHYSICS = "MuJoCo 2.0 via mujoco-py"  # where D4RL recorded and the papers scored


def physics_note(df: pd.DataFrame) -> str | None:
    """The sentence tables and summary carry when some run's dataset was recorded in another
    MuJoCo release than the one its policy was scored in (dataset_mujoco vs mujoco; runs
    without either recorded cannot say); None if no run says so."""
    if "dataset_mujoco" not in df or "mujoco" not in df:
        return None
    rec = df.dataset_mujoco.fillna(UNRECORDED).astype(str)
    scored = df.mujoco.fillna(UNRECORDED).astype(str)
    other = df[(rec != UNRECORDED) & (scored != UNRECORDED) & (rec != scored)]
    if other.empty:
        return None
    scored_text = ", ".join(f"MuJoCo {k}" for k in environment_counts(other, "mujoco"))
    recorded = ", ".join(f"MuJoCo {k}" for k in environment_counts(other, "dataset_mujoco"))
    return (f"Evaluation physics: {len(other)} of {len(df)} run(s) trained on data recorded in "
            f"{recorded} and their policies were scored in today's physics ({scored_text}); "
            f"the published numbers were obtained in {PUBLISHED_PHYSICS}.")


def environments(df: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct environment (ENV_COLUMNS) with its run count."""
    cols = [c for c in ENV_COLUMNS if c in df]
    if not cols:
        return pd.DataFrame({"runs": [len(df)]})
    return (df[cols].fillna(UNRECORDED).astype(str).value_counts(sort=True)
            .rename("runs").reset_index())


def _score_table(rows: list[dict]) -> pd.DataFrame:
    columns = ["method", "task", "seed", "normalized_score", "source"]
    if any(k in r for r in rows for k in ENV_COLUMNS):
        rows = [{**dict.fromkeys(ENV_COLUMNS, UNRECORDED), **r} for r in rows]
        columns += list(ENV_COLUMNS)
    df = pd.DataFrame(rows, columns=columns)
    dup = df.duplicated(["method", "task", "seed"], keep=False)
    if dup.any():
        raise ScoreError("several results for the same (method, task, seed): "
                         + ", ".join(df.loc[dup, "source"]))
    return df.sort_values(["method", "task", "seed"]).reset_index(drop=True)


def trial_runs(uri: str, experiments: list[str], step: str, filter_string: str = "") -> list:
    """Every run of `step` (tag) in the named experiments of an MLflow store or server,
    narrowed by an MLflow search `filter_string` (e.g. "tags.dag_run = '...'")."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    ids = []
    for name in experiments:
        exp = tracking.retry(client.get_experiment_by_name, name)
        if exp is None:
            raise ScoreError(f"MLflow store {uri}: no experiment named {name!r}")
        ids.append(exp.experiment_id)
    query = " and ".join(q for q in (f"tags.step = '{step}'", filter_string) if q)
    runs, token = [], None
    while True:
        page = tracking.retry(client.search_runs, ids, query, max_results=1000,
                              page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def scores_from_mlflow(uri: str, experiments: list[str], filter_string: str = "",
                       rule: str = "final") -> pd.DataFrame:
    """The rows `collect_scores` reads from eval.json files, read instead from the trial runs
    of an MLflow store or server (the evaluate step logs its score into its training run, tags
    method/task/seed): runs of several DAG invocations or clusters are analysed together.
    Trial runs not evaluated yet are left out (and logged); two runs of one (method, task,
    seed) are an error naming both: narrow them with `filter_string`. `rule`: which logged
    score is a run's (SCORE_RULES)."""
    from harness.training.evaluation import METRICS
    metric = METRICS[SCORE_RULES[rule][0]]
    rows, pending = [], []
    for run in trial_runs(uri, experiments, "train-policy", filter_string):
        where = f"MLflow run {run.info.run_id} ({run.info.run_name}, {uri})"
        if metric not in run.data.metrics:
            pending.append(run.info.run_name)
            continue
        missing = [k for k in ("method", "task", "seed") if not run.data.tags.get(k)]
        if missing:
            raise ScoreError(f"{where} lacks tag(s) {missing}")
        score = run.data.metrics[metric]
        if not np.isfinite(score):
            raise ScoreError(f"{where}: {metric!r} must be a finite number, got {score!r}")
        rows.append({"method": run.data.tags["method"], "task": run.data.tags["task"],
                     "seed": int(run.data.tags["seed"]), "normalized_score": float(score),
                     "source": f"{where}, dag_run {run.data.tags.get('dag_run', '?')}",
                     **environment_from_tags(run.data.tags)})
    if pending:
        log.warning("%d trial run(s) have no final evaluation yet, left out: %s",
                    len(pending), ", ".join(sorted(pending)))
    if not rows:
        raise ScoreError(f"MLflow store {uri}: no evaluated trial run in experiment(s) "
                         f"{experiments}" + (f" matching {filter_string!r}" if filter_string
                                             else ""))
    try:
        return _score_table(rows)
    except ScoreError as err:
        raise ScoreError(f"{err} (pick one with --filter, e.g. \"tags.dag_run = '<id>'\")") \
            from None


def common_tasks(df: pd.DataFrame, methods=None) -> list[str]:
    """Tasks every one of `methods` (default: all in df) has at least one run on."""
    methods = sorted(df.method.unique()) if methods is None else list(methods)
    sets = [set(df.loc[df.method == m, "task"]) for m in methods]
    return sorted(set.intersection(*sets)) if sets else []


def score_matrices(df: pd.DataFrame, tasks: list[str] | None = None,
                   notes: list[str] | None = None) -> dict[str, np.ndarray]:
    """{method: (runs x tasks) array} on the 0-100 scale, as rliable expects.

    Tasks default to those every method has (aggregates over different task sets are not
    comparable). rliable needs a rectangle, so a method with unequal seed counts across tasks
    keeps its lowest `min count` seeds on every task; each such drop is logged and appended to
    `notes`."""
    notes = [] if notes is None else notes
    tasks = common_tasks(df) if tasks is None else list(tasks)
    if not tasks:
        raise ScoreError("no task is shared by all methods: "
                         + "; ".join(f"{m}: {sorted(g.task.unique())}"
                                     for m, g in df.groupby("method")))
    dropped = sorted(set(df.task) - set(tasks))
    if dropped:
        notes.append(f"tasks not run by every method were left out of the aggregates: {dropped}")
    out = {}
    for method, g in df[df.task.isin(tasks)].groupby("method"):
        per_task = {t: g[g.task == t].sort_values("seed").normalized_score.to_numpy()
                    for t in tasks}
        n = min(len(v) for v in per_task.values())
        if n == 0:
            notes.append(f"{method} has no run on some shared task; left out")
            continue
        if any(len(v) != n for v in per_task.values()):
            notes.append(f"{method}: unequal seed counts per task "
                         f"({ {t: len(v) for t, v in per_task.items()} }); kept the first {n} "
                         f"seeds of each task")
        out[method] = np.stack([per_task[t][:n] for t in tasks], axis=1)
    for note in notes:
        log.warning(note)
    return out


# ---- statistics --------------------------------------------------------------------------
# Two engines give the same point estimates (rliable's functions on the data) and percentile
# CIs that agree within Monte-Carlo error:
# - "vectorised" (default): every replicate of a method at once, from index arrays drawn by a
#   numpy Generator seeded with `seed` (chunked to bound memory); one set of index arrays per
#   method serves all four metrics and its performance profile.
# - "rliable": rly.get_interval_estimates / create_performance_profile, one Python call per
#   replicate, indices from numpy's global RNG (re-seeded from `seed`); ~30x slower on the
#   paper grid (tests/benchmarks/test_bench_rliable.py).

ENGINES = ("vectorised", "rliable")
CI_SIZE = 0.95         # rliable's confidence_interval_size default (percentile method)
IQM_CUT = 0.25         # rliable's aggregate_iqm: scipy trim_mean(proportiontocut=0.25)
CHUNK_BYTES = 1 << 26  # float64 working set of one chunk of replicates (64 MiB)


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")


def _all_metrics(scores: np.ndarray) -> np.ndarray:
    return np.array([metrics.aggregate_iqm(scores), metrics.aggregate_mean(scores),
                     metrics.aggregate_median(scores),
                     metrics.aggregate_optimality_gap(scores, gamma=OPTIMALITY_GAMMA)])


def _profile(scores: np.ndarray, taus) -> np.ndarray:
    """Fraction of runs above each tau (vectorised over thresholds; rliable's default loops)."""
    return (scores[..., None] > np.asarray(taus)).mean(axis=(0, 1))


def stratified_indices(rng: np.random.Generator, shape: tuple[int, int],
                       reps: int) -> np.ndarray:
    """(reps, runs, tasks) run indices drawn with replacement within each task (column): the
    (runs, tasks) array rliable's StratifiedBootstrap draws per replicate, `reps` at once."""
    runs, tasks = shape
    return rng.integers(0, runs, size=(reps, runs, tasks))


def _run_counts(idx: np.ndarray) -> np.ndarray:
    """(R, tasks, runs) float counts of how often each run of each task was drawn."""
    reps, runs, tasks = idx.shape
    key = (np.arange(reps)[:, None, None] * tasks + np.arange(tasks)) * runs + idx
    return np.bincount(key.ravel(), minlength=reps * tasks * runs).reshape(
        reps, tasks, runs).astype(float)


def metric_replicates(scores: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """(R, 4) IQM, mean, median, optimality gap of each resample scores[idx[r], task].

    rliable's metrics batched over a leading replicate axis. IQM sorts each replicate's
    flattened scores once and averages the slice scipy's trim_mean keeps (cut = int(0.25 n),
    rounded down as scipy does); scipy partitions instead of sorting, which only reorders the
    sum (~1 ulp) and is ~7x slower here. Mean, median (of the task means) and optimality gap
    use rliable's numpy reductions and match it bit for bit on the same indices."""
    reps = len(idx)
    sample = scores[idx, np.arange(scores.shape[1])]  # (R, runs, tasks)
    flat = sample.reshape(reps, -1)                    # row-major, as trim_mean ravels
    lo = int(IQM_CUT * flat.shape[1])
    hi = flat.shape[1] - lo
    iqm = np.sort(flat, axis=1)[:, lo:hi].mean(axis=1)
    task_means = sample.mean(axis=1)
    gap = OPTIMALITY_GAMMA - np.minimum(flat, OPTIMALITY_GAMMA).mean(axis=1)
    return np.stack([iqm, task_means.mean(axis=1), np.median(task_means, axis=1), gap], 1)


def profile_replicates(scores: np.ndarray, idx: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """(R, T) `_profile` of each resample: run counts @ [score > tau] is the exact number of
    resampled runs above tau, divided by runs * tasks as that mean does (bit for bit)."""
    above = (scores.T[..., None] > taus).reshape(-1, len(taus)).astype(float)  # (tasks*runs, T)
    return (_run_counts(idx).reshape(len(idx), -1) @ above) / scores.size


def improvement_replicates(x: np.ndarray, y: np.ndarray, idx_x: np.ndarray,
                           idx_y: np.ndarray) -> np.ndarray:
    """(R,) `probability_of_improvement` of independent stratified resamples of x and y: per
    task the pairs (i, j) weigh count_x(i) count_y(j) in the exact integer counts of
    x_i > y_j and x_i == y_j, combined as that function combines its means (bit for bit)."""
    cx, cy = _run_counts(idx_x), _run_counts(idx_y)  # (R, tasks, n)
    pairs = len(x) * len(y)
    xt, yt = x.T[:, :, None], y.T[:, None, :]         # (tasks, n_x, 1), (tasks, 1, n_y)
    gt = np.einsum("rti,tij,rtj->rt", cx, (xt > yt).astype(float), cy) / pairs
    eq = np.einsum("rti,tij,rtj->rt", cx, (xt == yt).astype(float), cy) / pairs
    return (gt + 0.5 * eq).mean(axis=1)


def bootstrap_replicates(stat, shapes: list[tuple[int, int]], reps: int,
                         rng: np.random.Generator) -> np.ndarray:
    """stat(*index arrays) over `reps` stratified resamples: per chunk of replicates one
    index array per shape (independent draws, in order). The chunk size depends on the shapes
    only (about 8 float64 per resampled score per replicate within CHUNK_BYTES), so the same
    seed draws the same index arrays whatever `stat` computes."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    per_rep = 8 * 8 * sum(r * t for r, t in shapes)
    chunk = max(1, CHUNK_BYTES // per_rep)
    return np.concatenate([stat(*[stratified_indices(rng, s, min(chunk, reps - start))
                                  for s in shapes]) for start in range(0, reps, chunk)])


def percentile_ci(values: np.ndarray, size: float = CI_SIZE) -> np.ndarray:
    """(2, ...) percentile interval of (R, ...) replicates, as arch's conf_int(method=
    'percentile') computes it for rliable (np.percentile, linear interpolation)."""
    alpha = (1.0 - size) / 2
    return np.percentile(values, [100 * alpha, 100 * (1.0 - alpha)], axis=0)


def method_bootstrap(scores: np.ndarray, reps: int, seed: int, taus=None,
                     with_metrics: bool = True):
    """Point estimates and 95 % CIs of one method's (runs, tasks) scores: the four metrics
    (METRIC_NAMES), then with `taus` its performance profile, all from one set of index
    arrays drawn by a Generator seeded with `seed`.

    Returns (point (P,), ci (2, P)). Point estimates are rliable's functions on the data; with
    one run per task every resample is the data itself and the CI is the point, as rliable's."""
    stats, point = [], []
    if with_metrics:
        stats.append(lambda idx: metric_replicates(scores, idx))
        point.append(_all_metrics(scores))
    if taus is not None:
        stats.append(lambda idx: profile_replicates(scores, idx, taus))
        point.append(_profile(scores, taus))
    point = np.concatenate(point)
    if scores.shape[0] == 1:
        return point, np.stack([point, point])
    values = bootstrap_replicates(lambda idx: np.concatenate([s(idx) for s in stats], axis=1),
                                  [scores.shape], reps, np.random.default_rng(seed))
    return point, percentile_ci(values)


def _rliable_metrics(scores: np.ndarray, reps: int, seed: int):
    np.random.seed(seed)  # rliable resamples with np.random.choice
    point, ci = rly.get_interval_estimates({"m": scores}, _all_metrics, reps=reps)
    return point["m"], ci["m"]


def _aggregate_rows(method: str, scores: np.ndarray, point, ci) -> list[dict]:
    return [{"method": method, "metric": name, "estimate": float(point[i]),
             "ci_low": float(ci[0, i]), "ci_high": float(ci[1, i]),
             "n_runs": scores.shape[0], "n_tasks": scores.shape[1]}
            for i, name in enumerate(METRIC_NAMES)]


def aggregate(df: pd.DataFrame, reps: int = 2000, seed: int = 0,
              notes: list[str] | None = None, engine: str = "vectorised") -> pd.DataFrame:
    """IQM, mean, median and optimality gap per method with stratified-bootstrap 95 % CIs.

    Columns: method, metric, estimate, ci_low, ci_high, n_runs, n_tasks (0-100 scale). With
    one run per task the bootstrap has nothing to resample and the CI collapses to the point.
    `engine`: "vectorised" or "rliable" (see above)."""
    _check_engine(engine)
    rows = []
    for method, scores in score_matrices(df, notes=notes).items():
        point, ci = (method_bootstrap(scores, reps, seed) if engine == "vectorised"
                     else _rliable_metrics(scores, reps, seed))
        rows += _aggregate_rows(method, scores, point, ci)
    return pd.DataFrame(rows)


def default_taus(mats: dict[str, np.ndarray], n: int = 101) -> np.ndarray:
    """Thresholds over the range the scores span (rounded out to tens), so low-budget runs
    are not squeezed into the left edge of a fixed 0-100 axis."""
    low = min(0.0, min(float(m.min()) for m in mats.values()))
    top = max(10.0, max(float(m.max()) for m in mats.values()))
    return np.linspace(np.floor(low / 10) * 10, np.ceil(top / 10) * 10, n)


def performance_profiles(df: pd.DataFrame, reps: int = 2000, seed: int = 0,
                         taus: np.ndarray | None = None, engine: str = "vectorised"):
    """Score distributions P(score > tau) over runs and tasks, with 95 % CIs.

    Returns (taus, {method: (T,)}, {method: (2, T)})."""
    _check_engine(engine)
    mats = score_matrices(df)
    taus = default_taus(mats) if taus is None else np.asarray(taus, dtype=float)
    if engine == "rliable":
        np.random.seed(seed)
        profiles, cis = rly.create_performance_profile(mats, taus, custom_profile_func=_profile,
                                                       reps=reps)
        return taus, profiles, cis
    out = {m: method_bootstrap(s, reps, seed, taus, with_metrics=False) for m, s in mats.items()}
    return taus, {m: p for m, (p, _) in out.items()}, {m: ci for m, (_, ci) in out.items()}


def aggregates_and_profiles(df: pd.DataFrame, reps: int = 2000, seed: int = 0,
                            notes: list[str] | None = None, taus: np.ndarray | None = None):
    """`aggregate` and `performance_profiles` (vectorised engine, the same numbers) from one
    bootstrap per method: (aggregates DataFrame, (taus, profiles, cis))."""
    mats = score_matrices(df, notes=notes)
    taus = default_taus(mats) if taus is None else np.asarray(taus, dtype=float)
    k = len(METRIC_NAMES)
    rows, profiles, cis = [], {}, {}
    for method, scores in mats.items():
        point, ci = method_bootstrap(scores, reps, seed, taus)
        rows += _aggregate_rows(method, scores, point[:k], ci[:, :k])
        profiles[method], cis[method] = point[k:], ci[:, k:]
    return pd.DataFrame(rows), (taus, profiles, cis)


def probability_of_improvement(x: np.ndarray, y: np.ndarray) -> float:
    """P(X > Y) averaged over tasks: per task the Mann-Whitney U / (n_x n_y), ties count 1/2
    (equal to rliable's `metrics.probability_of_improvement`, vectorised over run pairs)."""
    gt = (x[:, None, :] > y[None, :, :]).mean(axis=(0, 1))
    eq = (x[:, None, :] == y[None, :, :]).mean(axis=(0, 1))
    return float((gt + 0.5 * eq).mean())


def pair_bootstrap(x: np.ndarray, y: np.ndarray, reps: int, seed: int,
                   engine: str = "vectorised"):
    """(P(X > Y), (2,) 95 % CI): x and y (runs, tasks), possibly of different run counts,
    resampled independently within each task (rliable's StratifiedIndependentBootstrap)."""
    _check_engine(engine)
    if engine == "rliable":
        np.random.seed(seed)
        point, ci = rly.get_interval_estimates(
            {"pair": [x, y]}, lambda a, b: np.array([probability_of_improvement(a, b)]),
            reps=reps)
        return float(point["pair"][0]), ci["pair"][:, 0]
    point = probability_of_improvement(x, y)
    if len(x) == len(y) == 1:  # nothing to resample: the CI is the point, as rliable's
        return point, np.array([point, point])
    values = bootstrap_replicates(lambda ix, iy: improvement_replicates(x, y, ix, iy),
                                  [x.shape, y.shape], reps, np.random.default_rng(seed))
    return point, percentile_ci(values)


def improvement_probabilities(df: pd.DataFrame, reps: int = 2000, seed: int = 0,
                              notes: list[str] | None = None,
                              engine: str = "vectorised") -> pd.DataFrame:
    """P(X > Y) for every registered comparison present (registry.comparisons: DyDiff-X over
    X, a method over each of its ablations), on the tasks both ran, with
    stratified independent bootstrap 95 % CIs. Pairs with a missing member are skipped and
    the reason appended to `notes`."""
    _check_engine(engine)
    notes = [] if notes is None else notes
    rows = []
    present = set(df.method)
    for x, y in registry.comparisons():
        if x not in present or y not in present:
            missing = [m for m in (x, y) if m not in present]
            # A pair half run is worth a note, unless the missing half is an optional variant
            # (an ablation, the fast-sampler preset) of a method the grid runs.
            if len(missing) == 1 and registry.METHODS[missing[0]].parent is None:
                notes.append(f"P({x} > {y}) skipped: no runs of {missing}")
            continue
        tasks = common_tasks(df, [x, y])
        if not tasks:
            notes.append(f"P({x} > {y}) skipped: no task run by both")
            continue
        mats = score_matrices(df[df.method.isin([x, y])], tasks=tasks, notes=notes)
        point, ci = pair_bootstrap(mats[x], mats[y], reps, seed, engine)
        rows.append({"x": x, "y": y, "probability": point,
                     "ci_low": float(ci[0]), "ci_high": float(ci[1]),
                     "n_runs_x": mats[x].shape[0], "n_runs_y": mats[y].shape[0],
                     "n_tasks": len(tasks)})
    for note in notes:
        log.warning(note)
    return pd.DataFrame(rows, columns=["x", "y", "probability", "ci_low", "ci_high",
                                       "n_runs_x", "n_runs_y", "n_tasks"])


# ---- figures -----------------------------------------------------------------------------

def ordered(methods) -> list[str]:
    """Methods in registry order (tables, legends), unregistered names last."""
    order = list(registry.METHODS)
    return sorted(methods, key=lambda m: (order.index(m) if m in order else len(order), m))


def plot_aggregates(agg: pd.DataFrame):
    """One panel per metric: point estimate and 95 % CI per method."""
    methods = ordered(agg.method.unique())
    fig, axes = plotting.new_figure(width=3.0 * len(METRIC_NAMES),
                                    height=1.0 + 0.45 * len(methods), ncols=len(METRIC_NAMES))
    for ax, name in zip(np.atleast_1d(axes).flat, METRIC_NAMES):
        sub = agg[agg.metric == name].set_index("method")
        for i, m in enumerate(methods):
            r = sub.loc[m]
            c = plotting.color(m, i)
            ax.barh(i, r.ci_high - r.ci_low, left=r.ci_low, height=0.6, color=c, alpha=0.35)
            ax.plot([r.estimate, r.estimate], [i - 0.3, i + 0.3], color=c, lw=2.5)
        ax.set_yticks(range(len(methods)))
        ax.set_yticklabels([plotting.label(m) for m in methods] if name == METRIC_NAMES[0]
                           else [])
        ax.set_ylim(-0.6, len(methods) - 0.4)
        ax.set_title(name + (" (lower is better)" if name == "Optimality Gap" else ""))
        ax.set_xlabel("D4RL normalised score")
        ax.set_ylabel("method" if name == METRIC_NAMES[0] else "")
    n_runs = agg.groupby("method").n_runs.first()
    fig.suptitle(f"Aggregate scores, 95 % stratified-bootstrap CIs "
                 f"({agg.n_tasks.iloc[0]} tasks, {n_runs.min()}-{n_runs.max()} seeds/task)"
                 if n_runs.min() != n_runs.max() else
                 f"Aggregate scores, 95 % stratified-bootstrap CIs "
                 f"({agg.n_tasks.iloc[0]} tasks, {n_runs.min()} seeds/task)")
    return fig


def plot_profiles(taus, profiles, cis):
    methods = ordered(profiles)
    fig, ax = plotting.new_figure(6.0, 4.0)
    plot_utils.plot_performance_profiles(
        {m: profiles[m] for m in methods}, taus,
        performance_profile_cis={m: cis[m] for m in methods}, ax=ax,
        colors={m: plotting.color(m, i) for i, m in enumerate(methods)},
        xlabel=r"D4RL normalised score $\tau$", ylabel=r"fraction of runs with score $> \tau$",
        labelsize=10, ticklabelsize=9)
    for line, m in zip(ax.get_lines(), methods):
        line.set_label(plotting.label(m))
    ax.legend(loc="upper right", frameon=False)
    ax.set_title("Performance profiles (score distributions, 95 % CIs)")
    return fig


def plot_improvement(poi: pd.DataFrame):
    fig, ax = plotting.new_figure(6.0, 1.2 + 0.6 * max(len(poi), 1))
    for i, r in enumerate(poi.itertuples()):
        c = plotting.color(r.x, i)
        ax.barh(i, r.ci_high - r.ci_low, left=r.ci_low, height=0.5, color=c, alpha=0.35)
        ax.plot([r.probability] * 2, [i - 0.25, i + 0.25], color=c, lw=2.5)
    ax.axvline(0.5, color="grey", ls="--", lw=1)
    ax.set_yticks(range(len(poi)))
    ax.set_yticklabels([f"{plotting.label(r.x)} > {plotting.label(r.y)}" for r in poi.itertuples()])
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.6, max(len(poi), 1) - 0.4)
    ax.set_xlabel("probability of improvement P(X > Y)")
    ax.set_ylabel("pair X > Y")
    ax.set_title("Probability of improvement, 95 % CIs (0.5 = no difference)")
    if not len(poi):  # the report always has this figure; say why it is empty
        ax.text(0.5, 0.0, "no compared pair (DyDiff-X / X, method / ablation) in these runs", ha="center", va="center",
                color="grey", transform=ax.get_yaxis_transform())
    return fig


# ---- the step the CLI calls --------------------------------------------------------------

def run_aggregate(score_files: list[Path], out_dir: Path, reps: int = 2000,
                  seed: int = 0, rule: str = "final", engine: str = "vectorised") -> dict:
    """Aggregates, profiles and P(improvement) -> CSVs + PNG/PDF figures in `out_dir`, from
    eval.json files or the same rows read from MLflow (`scores_from_mlflow`). `engine`:
    "vectorised" (one bootstrap per method for its aggregates and profile) or "rliable".

    Returns {"aggregates": DataFrame, "improvement": DataFrame, "profiles": DataFrame,
    "scores": DataFrame, "notes": [str], "reps": int, "files": [Path]}."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    _check_engine(engine)
    out_dir = Path(out_dir)
    df = collect_scores(score_files, rule)
    notes: list[str] = []
    if engine == "vectorised":
        agg, (taus, profiles, cis) = aggregates_and_profiles(df, reps, seed, notes)
    else:
        agg = aggregate(df, reps=reps, seed=seed, notes=notes, engine=engine)
        taus, profiles, cis = performance_profiles(df, reps=reps, seed=seed, engine=engine)
    poi = improvement_probabilities(df, reps=reps, seed=seed, notes=notes, engine=engine)
    env_notes = environment_notes(df)
    for note in env_notes:
        log.warning(note)
    prof = pd.DataFrame([{"method": m, "tau": t, "fraction": profiles[m][j],
                          "ci_low": cis[m][0, j], "ci_high": cis[m][1, j]}
                         for m in profiles for j, t in enumerate(taus)])
    notes = list(dict.fromkeys(notes))  # de-duplicate, keep order
    files = []
    for name, table in (("aggregates", agg), ("improvement", poi), ("profiles", prof),
                        ("scores", df.drop(columns=["source", *(c for c in ENV_COLUMNS
                                                                if c in df)]))):
        path = out_dir / f"{name}.csv"
        atomic_write_text(path, table.to_csv(index=False, float_format="%.6g"))
        files.append(path)
    files += plotting.save_figure(plot_aggregates(agg), out_dir / "aggregate_intervals")
    files += plotting.save_figure(plot_profiles(taus, profiles, cis),
                                  out_dir / "performance_profiles")
    files += plotting.save_figure(plot_improvement(poi), out_dir / "improvement_probability")
    path = out_dir / "environments.csv"
    atomic_write_text(path, environments(df).to_csv(index=False))
    files.append(path)
    atomic_write_text(out_dir / "notes.json", json.dumps({"reps": reps, "seed": seed,
                                                          "notes": notes,
                                                          "environment_notes": env_notes},
                                                         indent=2))
    return {"aggregates": agg, "improvement": poi, "profiles": prof, "scores": df,
            "notes": notes, "environment_notes": env_notes, "reps": reps, "files": files}
