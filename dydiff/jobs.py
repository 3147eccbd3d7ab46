"""From one experiment config (config/*.yaml) to the resolved config of each job.

The Snakefile and the CLI both call these functions, so a job run by hand
(`dydiff-bench train-policy --configfile config/smoke.yaml --method mopo ...`) and the same job
run by Snakemake see exactly the same settings. A job spec is a plain JSON-able dict; the part
under "config" is what the job's result depends on (Snakemake reruns a job when it changes).
"""
from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Any

import yaml

from dydiff.config import ConfigError, config_hash, from_dict
from dydiff.envs import DATASET_KINDS, TASKS, family_of

METHODS = ("td3bc", "cql", "mopo", "mbpo", "dydiff-td3bc", "dydiff-cql")
# Which trained models each method's rollouts need (trained once per task, shared).
MODELS_FOR_METHOD = {
    "td3bc": (), "cql": (),
    "mopo": ("ensemble",), "mbpo": ("ensemble",),
    "dydiff-td3bc": ("diffusion", "reward"), "dydiff-cql": ("diffusion", "reward"),
}
# Config sections -> the dataclass that validates them ("module:Class", imported lazily).
MODEL_CONFIGS = {
    "ensemble": "baselines.ensemble:EnsembleConfig",
    "reward": "dydiff.reward_model:RewardModelConfig",
    "diffusion": "dydiff.diffusion.train:DiffusionConfig",
}
ROLLOUT_CONFIGS = {
    "mopo": "baselines.mopo:MOPOConfig", "mbpo": "baselines.mopo:MOPOConfig",
    "dydiff-td3bc": "dydiff.rollout:DyDiffConfig", "dydiff-cql": "dydiff.rollout:DyDiffConfig",
}
TOP_LEVEL_KEYS = {"name", "results_dir", "tasks", "seeds", "methods", "data", "models",
                  "policy", "per_task", "evaluation", "rollout_error", "analysis", "mlflow",
                  "resources"}


def import_object(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def deep_merge(base: dict, override: dict) -> dict:
    """Recursive dict update (override wins); neither input is modified."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def typed_overrides(value: Any) -> Any:
    """Re-type `snakemake --config` values: Snakemake parses nested values with YAML's
    BaseLoader, so `seeds=[0,1]` arrives as ['0', '1'] and `enabled: false` as 'false'."""
    if isinstance(value, dict):
        return {k: typed_overrides(v) for k, v in value.items()}
    if isinstance(value, list):
        return [typed_overrides(v) for v in value]
    if isinstance(value, str):
        parsed = yaml.safe_load(value) if value.strip() else value
        if isinstance(parsed, str):
            try:  # YAML 1.1 reads '1e-3' as a string
                return float(parsed)
            except ValueError:
                return parsed
        return parsed
    return value


def load_config(path: str | Path, overrides: dict | None = None) -> dict:
    """Read a YAML experiment config, apply overrides and validate it (ConfigError if bad)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    cfg = deep_merge(cfg, overrides or {})
    validate(cfg)
    return cfg


def split_task(task: str) -> tuple[str, str]:
    """'hopper-medium-replay' -> ('hopper', 'medium-replay'), validating both parts."""
    family = family_of(task)
    kind = task[len(family) + 1:]
    if kind not in DATASET_KINDS:
        raise ConfigError(f"tasks: {task!r} has unknown dataset kind {kind!r}; "
                          f"known kinds: {list(DATASET_KINDS)}")
    return family, kind


def validate(cfg: dict) -> None:
    """Every check that can run before a job starts: names, grids, each component config."""
    unknown = sorted(set(cfg) - TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; known: {sorted(TOP_LEVEL_KEYS)}")
    for key in ("name", "tasks", "seeds", "methods"):
        if key not in cfg:
            raise ConfigError(f"missing required key '{key}'")
    for task in cfg["tasks"]:
        try:
            split_task(task)
        except KeyError as err:
            raise ConfigError(f"tasks: {err.args[0]}") from None
    bad = [m for m in cfg["methods"] if m not in METHODS]
    if bad:
        raise ConfigError(f"methods: unknown method(s) {bad}; known: {list(METHODS)}")
    if not cfg["seeds"] or any(not isinstance(s, int) or s < 0 for s in cfg["seeds"]):
        raise ConfigError(f"seeds: expected a non-empty list of non-negative integers, "
                          f"got {cfg['seeds']!r}")
    unknown_tasks = sorted(set(cfg.get("per_task") or {}) - set(cfg["tasks"]))
    if unknown_tasks:
        raise ConfigError(f"per_task: override(s) for task(s) {unknown_tasks} not in tasks")
    # Building every job's config runs each dataclass's from_dict + validate().
    if data_source(cfg) == "local":
        for family in families(cfg):
            generate_job(cfg, family)
    for task in cfg["tasks"]:
        if data_source(cfg) != "local":
            import_job(cfg, task)
        for model in needed_models(cfg):
            model_job(cfg, model, task)
        for method in cfg["methods"]:
            policy_job(cfg, method, task, cfg["seeds"][0])


def task_config(cfg: dict, task: str) -> dict:
    """The config with the task's `per_task` overrides merged in."""
    return deep_merge({k: v for k, v in cfg.items() if k != "per_task"},
                      (cfg.get("per_task") or {}).get(task, {}))


def results_root(cfg: dict) -> Path:
    return Path(cfg.get("results_dir", "results")) / cfg["name"]


def needed_models(cfg: dict) -> list[str]:
    need = {m for method in cfg["methods"] for m in MODELS_FOR_METHOD[method]}
    if rollout_error_enabled(cfg):
        need |= {"ensemble", "diffusion", "reward"}
    return [m for m in ("ensemble", "reward", "diffusion") if m in need]


# ---- paths (one place, used by the Snakefile and the CLI) ----------------------------------

def dataset_path(cfg: dict, task: str) -> Path:
    return results_root(cfg) / "datasets" / f"{task}.hdf5"


def model_dir(cfg: dict, model: str, task: str) -> Path:
    return results_root(cfg) / "models" / model / task


def policy_dir(cfg: dict, method: str, task: str, seed: int) -> Path:
    return results_root(cfg) / "policies" / method / task / f"seed{seed}"


# ---- job specs -----------------------------------------------------------------------------

def _validated(section: str, cls_path: str, data: dict | None) -> dict:
    from dataclasses import asdict
    return asdict(from_dict(import_object(cls_path), data or {}, where=section))


def data_source(cfg: dict) -> str:
    source = (cfg.get("data") or {}).get("source", "local")
    if source not in ("local", "d4rl", "minari"):
        raise ConfigError(f"data.source: {source!r} is not one of ['local', 'd4rl', 'minari']")
    return source


def families(cfg: dict) -> dict[str, list[str]]:
    """{'hopper': ['medium', 'medium-replay'], ...}: the dataset kinds each family needs."""
    out: dict[str, list[str]] = {}
    for task in cfg["tasks"]:
        family, kind = split_task(task)
        out.setdefault(family, []).append(kind)
    return out


def generate_job(cfg: dict, family: str) -> dict:
    """Build a family's datasets locally: one online SAC run yields every kind."""
    data = cfg.get("data") or {}
    kinds = families(cfg)[family]
    return {"step": "generate-datasets", "family": family, "kinds": kinds,
            "outputs": {k: str(dataset_path(cfg, f"{family}-{k}")) for k in kinds},
            "out": str(results_root(cfg) / "datasets" / "generated" / family),
            "config": {"generate": _validated("data.generate",
                                              "dydiff.data.generate:GenerateConfig",
                                              data.get("generate")),
                       "seed": data.get("seed", 0)}}


def import_job(cfg: dict, task: str) -> dict:
    """Read a task's dataset from D4RL's hdf5 files or a local Minari root."""
    data = cfg.get("data") or {}
    family, kind = split_task(task)
    source = data_source(cfg)
    name = (f"{task}-{data.get('d4rl_version', 'v2')}" if source == "d4rl"
            else f"mujoco/{family}/{kind}-{data.get('minari_version', 'v0')}")
    return {"step": "import-dataset", "task": task, "out": str(dataset_path(cfg, task)),
            "config": {"source": source, "name": name}}


def model_job(cfg: dict, model: str, task: str) -> dict:
    tcfg = task_config(cfg, task)
    models = tcfg.get("models") or {}
    return {"step": f"train-{model}", "task": task, "dataset": str(dataset_path(cfg, task)),
            "out": str(model_dir(cfg, model, task)),
            "config": {model: _validated(f"models.{model}", MODEL_CONFIGS[model],
                                         models.get(model)),
                       "seed": models.get("seed", 0)}}


def policy_job(cfg: dict, method: str, task: str, seed: int) -> dict:
    """Shared agent/loop settings + the method's overrides (+ per-task overrides)."""
    if method not in METHODS:
        raise ConfigError(f"method: unknown method {method!r}; known: {list(METHODS)}")
    tcfg = task_config(cfg, task)
    policy = tcfg.get("policy") or {}
    per_method = (policy.get("methods") or {}).get(method, {})
    unknown = sorted(set(per_method) - {"offline", "rollout", "td3bc", "cql", "sac"})
    if unknown:
        raise ConfigError(f"policy.methods.{method}: unknown key(s) {unknown}")
    merged = deep_merge({k: v for k, v in policy.items() if k != "methods"}, per_method)
    rollout = merged.pop("rollout", {}) or {}
    if method == "mbpo":  # MBPO-style = MOPO's generator without the uncertainty penalty
        given = sorted({"penalty", "penalty_coef"} & set(rollout))
        if given:
            raise ConfigError(f"policy.methods.mbpo.rollout: {given} not allowed: MBPO has no "
                              f"reward penalty (use method mopo)")
        rollout = {**rollout, "penalty": "none", "penalty_coef": 0.0}
    if method in ROLLOUT_CONFIGS:
        rollout = _validated(f"policy.methods.{method}.rollout", ROLLOUT_CONFIGS[method], rollout)
    elif rollout:
        raise ConfigError(f"policy.methods.{method}.rollout: {method} is model-free and takes "
                          f"no rollout settings")
    from dataclasses import asdict
    policy_cfg = asdict(from_dict(import_object("dydiff.rl.train:PolicyConfig"),
                                  {**merged, "rollout": rollout}, where=f"policy[{method}]"))
    evaluation = tcfg.get("evaluation") or {}
    return {"step": "train-policy", "method": method, "task": task, "seed": seed,
            "dataset": str(dataset_path(cfg, task)),
            "model_dirs": {m: str(model_dir(cfg, m, task)) for m in MODELS_FOR_METHOD[method]},
            "out": str(policy_dir(cfg, method, task, seed)),
            "config": {"policy": policy_cfg, "seed": seed,
                       "final_eval_episodes": evaluation.get("final_episodes", 10)}}


def job_hash(spec: dict) -> str:
    return config_hash(spec["config"])


def eval_job(cfg: dict, method: str, task: str, seed: int) -> dict:
    """Final evaluation of a trained policy in the simulator (fresh episodes, own seed)."""
    evaluation = task_config(cfg, task).get("evaluation") or {}
    pdir = policy_dir(cfg, method, task, seed)
    return {"step": "evaluate", "method": method, "task": task, "seed": seed,
            "policy_dir": str(pdir), "out": str(pdir / "eval.json"),
            "config": {"episodes": evaluation.get("final_episodes", 10),
                       "seed": 1_000_003 + seed}}


def run_context(cfg: dict) -> dict:
    """Where a job logs: the MLflow experiment (= config name) and the results folder.

    The tracking URI is not part of a job spec (changing it must not rerun jobs): it comes
    from MLFLOW_TRACKING_URI, which the Snakefile sets from `mlflow.tracking_uri`, else the
    sqlite store under results_dir (dydiff.tracking.default_uri).
    """
    return {"experiment": cfg["name"], "results_dir": str(cfg.get("results_dir", "results"))}


def tracking_env(cfg: dict) -> dict[str, str]:
    """Environment for jobs: MLflow URI from the config (if given) and the on/off switch."""
    mlflow = cfg.get("mlflow") or {}
    env = {"DYDIFF_MLFLOW": "1" if mlflow.get("enabled", True) else "0"}
    if mlflow.get("tracking_uri"):
        env["MLFLOW_TRACKING_URI"] = mlflow["tracking_uri"]
    return env


def all_jobs(cfg: dict) -> list[dict]:
    """Every training/evaluation job of the grid (for dry listings and tests)."""
    out: list[dict] = []
    if data_source(cfg) == "local":
        out += [generate_job(cfg, f) for f in families(cfg)]
    else:
        out += [import_job(cfg, t) for t in cfg["tasks"]]
    for task in cfg["tasks"]:
        out += [model_job(cfg, m, task) for m in needed_models(cfg)]
        for method in cfg["methods"]:
            for seed in cfg["seeds"]:
                out += [policy_job(cfg, method, task, seed), eval_job(cfg, method, task, seed)]
    return out


# ---- analysis ------------------------------------------------------------------------------

def analysis_dir(cfg: dict) -> Path:
    return results_root(cfg) / "analysis"


def eval_paths(cfg: dict) -> list[str]:
    return [str(policy_dir(cfg, m, t, s) / "eval.json")
            for m in cfg["methods"] for t in cfg["tasks"] for s in cfg["seeds"]]


def rollout_error_job(cfg: dict, task: str) -> dict:
    """Generated vs simulator trajectories for one task (needs stored qpos/qvel)."""
    rcfg = task_config(cfg, task).get("rollout_error") or {}
    method = rcfg.get("policy_method", "td3bc")
    return {"step": "rollout-error", "task": task, "dataset": str(dataset_path(cfg, task)),
            "model_dirs": {m: str(model_dir(cfg, m, task)) for m in ("ensemble", "diffusion")},
            "reward_dir": str(model_dir(cfg, "reward", task)),
            "policy_dir": str(policy_dir(cfg, method, task, cfg["seeds"][0])),
            "out": str(results_root(cfg) / "rollout_error" / task),
            "config": {"horizon": rcfg.get("horizon", 100), "n_starts": rcfg.get("n_starts", 64),
                       "seed": rcfg.get("seed", 0), "policy_method": method}}


def analysis_job(cfg: dict) -> dict:
    acfg = cfg.get("analysis") or {}
    rerr = [str(results_root(cfg) / "rollout_error" / t / "rollout_error.csv")
            for t in cfg["tasks"]] if rollout_error_enabled(cfg) else []
    return {"step": "analyze", "scores": eval_paths(cfg), "rollout_error": rerr,
            "out": str(analysis_dir(cfg)),
            "config": {"reps": acfg.get("reps", 2000), "seed": acfg.get("seed", 0),
                       "name": cfg["name"], "seeds": len(cfg["seeds"])}}


def rollout_error_enabled(cfg: dict) -> bool:
    return bool((cfg.get("rollout_error") or {}).get("enabled", True))
