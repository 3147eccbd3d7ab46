"""From one experiment config (config/*.yaml) to every job of the grid and every output path.

The Snakefile and the CLI both call these functions, so a job run by hand
(`dydiff-bench train-policy --configfile config/smoke.yaml --method mopo ...`) and the same job
run by Snakemake see exactly the same settings. A job spec is a plain JSON-able dict; the part
under "config" is what the job's result depends on (Snakemake reruns a job when it changes).
"""
from __future__ import annotations

import copy
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

from harness import registry
from harness.config import ConfigError, check_schema, deep_merge, from_dict, read_yaml
from harness.data.dataset import DatasetError
from harness.envs import dataset_kinds, family_of
from harness.levers import USED_BY, job_levers

SCHEMA = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"

# Every output of the DAG, spelled once. {root} is results/<name>; the other fields are the
# rules' wildcards: `pattern` keeps them for a rule, `path` fills them for one job.
PATHS = {
    "dataset": "{root}/datasets/{task}.hdf5",
    "generated": "{root}/datasets/generated/{family}",
    "model_dir": "{root}/models/{model}/{task}/seed{mseed}",
    "model": "{root}/models/{model}/{task}/seed{mseed}/model.pt",
    "policy_dir": "{root}/policies/{method}/{task}/seed{seed}",
    "final": "{root}/policies/{method}/{task}/seed{seed}/final.json",
    "policy": "{root}/policies/{method}/{task}/seed{seed}/policy.pt",
    "eval": "{root}/policies/{method}/{task}/seed{seed}/eval.json",
    "rollout_error_dir": "{root}/rollout_error/{task}",
    "rollout_error_csv": "{root}/rollout_error/{task}/rollout_error.csv",
    "rollout_error_png": "{root}/rollout_error/{task}/rollout_error.png",
    "rollout_error_at_h_png": "{root}/rollout_error/{task}/rollout_error_at_H.png",
    "analysis_dir": "{root}/analysis",
    "aggregates": "{root}/analysis/aggregates.csv",
    "aggregate_intervals": "{root}/analysis/aggregate_intervals.png",
    "performance_profiles": "{root}/analysis/performance_profiles.png",
    "improvement": "{root}/analysis/improvement_probability.png",
    "tables": "{root}/analysis/tables/tables.md",
    "summary": "{root}/analysis/summary.md",
    "tables_html": "{root}/analysis/tables/tables.html",  # the report's copies (HTML renders)
    "summary_html": "{root}/analysis/summary.html",
    "log_generate": "{root}/logs/datasets/{family}.log",
    "log_import": "{root}/logs/datasets/{task}.log",
    "log_model": "{root}/logs/models/{model}/{task}/seed{mseed}.log",
    "log_policy": "{root}/logs/policies/{method}/{task}/seed{seed}.log",
    "log_evaluate": "{root}/logs/evaluate/{method}/{task}/seed{seed}.log",
    "log_rollout_error": "{root}/logs/rollout_error/{task}.log",
    "log_analysis": "{root}/logs/analysis.log",
}


def results_root(cfg: dict) -> Path:
    return Path(cfg.get("results_dir", "results")) / cfg["name"]


def pattern(cfg: dict, kind: str) -> str:
    """PATHS[kind] under this config's results folder, wildcards left for a rule."""
    return PATHS[kind].replace("{root}", str(results_root(cfg)))


def path(cfg: dict, kind: str, **wildcards) -> Path:
    """PATHS[kind] for one job."""
    return Path(PATHS[kind].format(root=results_root(cfg), **wildcards))


# ---- validation (once, before any job) -------------------------------------------------------

@lru_cache(maxsize=1)
def _schema_text() -> str:
    return SCHEMA.read_text()


def schema() -> dict:
    """The config schema with the names it checks filled in from the registry."""
    import yaml
    out = yaml.safe_load(_schema_text())
    props = out["properties"]
    props["methods"]["items"]["enum"] = list(registry.METHODS)
    props["ablations"]["items"]["enum"] = registry.ablation_groups()
    props["models"]["properties"].update({m: {"type": "object"} for m in registry.MODELS})
    props["policy"]["properties"].update({a: {"type": "object"} for a in registry.AGENTS})
    props["policy"]["properties"]["methods"]["propertyNames"] = {"enum": list(registry.METHODS)}
    props["devices"]["properties"].update({m: {"type": "string"} for m in registry.MODELS})
    return out


def load_config(path: str | Path, overrides: dict | None = None) -> dict:
    """Read a YAML experiment config, apply overrides, validate and resolve it (ConfigError
    naming the file and key if bad)."""
    cfg = read_yaml(path)  # its errors name the file and line already
    try:
        return resolve(cfg, overrides, source=path)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def resolve(cfg: dict, overrides: dict | None = None,
            source: str | Path | None = None) -> dict:
    """The config a run uses: its `extends` merged in, then the overrides (`--set`,
    `snakemake --config`), validated, its `ablations` groups expanded into `methods`
    (registry.with_ablations: every variant of the group whose base is run). `source`: the
    file `cfg` was read from, so an `extends` chain that comes back to it is named."""
    cfg = with_extends(cfg, (Path(source),) if source is not None else ())
    if overrides:
        cfg = layered(cfg, overrides)
    check_schema(cfg, schema())
    cfg = {**cfg, "methods": registry.with_ablations(cfg["methods"], cfg.get("ablations") or [])}
    validate(cfg)
    return cfg


def with_extends(cfg: dict, chain: tuple[Path, ...] = ()) -> dict:
    """`extends: config/paper.yaml` (a path from the repository root, where Snakemake runs):
    that config's values under this one's, so a variant grid states only what differs.
    `chain`: the files read so far (the first: the config's own, when known); an `extends`
    that names one of them again is a ConfigError naming the cycle."""
    if not cfg.get("extends"):
        return cfg
    target = cfg["extends"]
    if not isinstance(target, str):
        raise ConfigError(f"extends: expected a config file path, got {target!r}")
    parent = Path(target)
    seen = [p.resolve() for p in chain]
    if parent.resolve() in seen:
        cycle = [*chain[seen.index(parent.resolve()):], parent]
        raise ConfigError("extends: the chain loops: " + " -> ".join(map(str, cycle)))
    own = {k: v for k, v in cfg.items() if k != "extends"}
    return layered(with_extends(read_yaml(parent), (*chain, parent)), own)


def layered(base: dict, layer: dict) -> dict:
    """`layer` merged over `base`. A grid narrowed by the layer (fewer tasks or methods) drops
    the base's per-task and per-method settings of what it no longer runs; the layer's own
    such settings stay, and `validate` rejects them if they name nothing the grid runs."""
    out = deep_merge(base, layer)
    own_tasks = layer.get("per_task") or {}
    if isinstance(out.get("per_task"), dict) and isinstance(out.get("tasks"), list):
        out["per_task"] = {t: v for t, v in out["per_task"].items()
                           if t in out["tasks"] or t in own_tasks}
    configured = _configured_methods(out)

    def keep_methods(merged, own) -> dict:
        policy = merged.get("policy") if isinstance(merged, dict) else None
        sections = policy.get("methods") if isinstance(policy, dict) else None
        if not isinstance(sections, dict):
            return merged
        own_names = set(((own or {}).get("policy") or {}).get("methods") or {})
        return {**merged, "policy": {**policy, "methods": {
            m: v for m, v in sections.items() if m in configured or m in own_names}}}

    out = keep_methods(out, layer)
    per_method = (out.get("devices") or {}).get("per_method") if isinstance(
        out.get("devices"), dict) else None
    if isinstance(per_method, dict):  # devices of methods no longer run go the same way
        own_devices = set(((layer.get("devices") or {}).get("per_method") or {}))
        out["devices"] = {**out["devices"], "per_method": {
            m: v for m, v in per_method.items() if m in configured or m in own_devices}}
    if isinstance(out.get("per_task"), dict):
        out["per_task"] = {t: keep_methods(v, own_tasks.get(t))
                           for t, v in out["per_task"].items()}
    return out


def _configured_methods(cfg: dict) -> set[str]:
    """The grid's methods, its ablation variants and every method they derive from: the names
    a `policy.methods.<name>` section may use."""
    methods, groups = cfg.get("methods"), cfg.get("ablations") or []
    if not isinstance(methods, list) or not isinstance(groups, list):
        return set()
    methods = registry.with_ablations(
        [m for m in methods if isinstance(m, str) and m in registry.METHODS],
        [g for g in groups if isinstance(g, str) and g in registry.ABLATIONS])
    return {m.name for name in methods for m in registry.lineage(name)}


def validate(cfg: dict) -> None:
    """What the schema cannot check, on a config `resolve` has checked the shape of: task
    names, keys that must name each other, then every job's component configs (each
    dataclass's from_dict + validate): all before a job starts."""
    for task in cfg["tasks"]:
        split_task(task)
    unknown = sorted(set(cfg.get("per_task") or {}) - set(cfg["tasks"]))
    if unknown:
        raise ConfigError(f"per_task: override(s) for task(s) {unknown} not in tasks")
    _check_files(cfg)
    configured = _configured_methods(cfg)
    for task in [None, *cfg["tasks"]]:
        section = task_config(cfg, task) if task else cfg
        where = f"per_task.{task}.policy.methods" if task else "policy.methods"
        unused = sorted(set((section.get("policy") or {}).get("methods") or {}) - configured)
        if unused:
            raise ConfigError(f"{where}: settings for method(s) {unused}, which the grid does "
                              f"not run (methods: {cfg['methods']})")
    policy_method = (cfg.get("rollout_error") or {}).get("policy_method")
    if rollout_error_enabled(cfg) and policy_method is not None \
            and policy_method not in cfg["methods"]:
        raise ConfigError(f"rollout_error.policy_method: {policy_method!r} is not one of "
                          f"methods {cfg['methods']}")
    _check_devices(cfg)
    _validated("harness.data.consistency:ConsistencyConfig",  # also when no import uses it
               (cfg.get("data") or {}).get("consistency"), "data.consistency")
    all_jobs(cfg, seeds=cfg["seeds"][:1])


def data_files(cfg: dict) -> dict[str, str]:
    """`data.files`: {task: path of a user's D4RL-layout hdf5 file} imported for those tasks
    in place of `data.source`'s (data.source: files takes every task from here)."""
    return dict((cfg.get("data") or {}).get("files") or {})


def _check_files(cfg: dict) -> None:
    from harness.data.sources import HDF5_SUFFIXES
    files, source = data_files(cfg), data_source(cfg)
    if files and source == "local":
        raise ConfigError(f"data.files: set for {sorted(files)}, but data.source is 'local' "
                          f"(every task generated here); use data.source: files (every task "
                          f"from data.files), d4rl or minari (the others from there)")
    for task, file in files.items():
        if task not in cfg["tasks"]:
            raise ConfigError(f"data.files.{task}: not a task of the grid (tasks: "
                              f"{cfg['tasks']})")
        if not str(file).endswith(HDF5_SUFFIXES):
            raise ConfigError(f"data.files.{task}: {file!r} is not an hdf5 file path (one of "
                              f"{list(HDF5_SUFFIXES)})")
    missing = [t for t in cfg["tasks"] if t not in files]
    if source == "files" and missing:
        raise ConfigError(f"data.files: no file for task(s) {missing}, and data.source: files "
                          f"takes every task from data.files")


def check_datasets(cfg: dict) -> None:
    """`data.source: d4rl | minari`: look up every dataset the grid imports and has not
    imported yet, and name all missing ones in one error, before the first job starts."""
    from harness.data.sources import HOW_TO_GET_DATA, locate_dataset
    if data_source(cfg) == "local":
        return
    missing = []
    for task in cfg["tasks"]:
        job = import_job(cfg, task)
        if not Path(job["out"]).exists():
            try:
                locate_dataset(job["config"]["name"])
            except DatasetError as err:
                missing.append(str(err).split(". ")[0])
    if missing:
        raise ConfigError(f"data.source: {data_source(cfg)}: {len(missing)} of "
                          f"{len(cfg['tasks'])} dataset(s) not found: " + "; ".join(missing)
                          + f". {HOW_TO_GET_DATA}")


# ---- the grid --------------------------------------------------------------------------------

def split_task(task: str) -> tuple[str, str]:
    """'hopper-medium-replay' -> ('hopper', 'medium-replay')."""
    try:
        family = family_of(task)
    except KeyError as err:
        raise ConfigError(f"tasks: {err.args[0]}") from None
    kind = task[len(family) + 1:]
    if kind not in dataset_kinds(family):
        raise ConfigError(f"tasks: {task!r} has unknown dataset kind {kind!r}; "
                          f"known {family} kinds: {list(dataset_kinds(family))}")
    return family, kind


def task_config(cfg: dict, task: str) -> dict:
    """The config with the task's `per_task` overrides merged in."""
    return deep_merge({k: v for k, v in cfg.items() if k != "per_task"},
                      (cfg.get("per_task") or {}).get(task, {}))


def data_source(cfg: dict) -> str:
    return (cfg.get("data") or {}).get("source", "local")


def families(cfg: dict) -> dict[str, list[str]]:
    """{'hopper': ['medium', 'medium-replay'], ...}: the dataset kinds each family needs."""
    out: dict[str, list[str]] = {}
    for task in cfg["tasks"]:
        family, kind = split_task(task)
        out.setdefault(family, []).append(kind)
    return out


def rollout_error_enabled(cfg: dict) -> bool:
    return bool((cfg.get("rollout_error") or {}).get("enabled", True))


# The rollout-error study's models: MOPO's ensemble, the diffusion model, and for its DyDiff
# generator the reward model and the ensemble DyDiff starts from (dydiff.rollout.ENSEMBLE).
ROLLOUT_ERROR_MODELS = ("ensemble", "ensemble-dydiff", "diffusion", "reward")


def needed_models(cfg: dict) -> list[str]:
    need = {m for name in cfg["methods"] for m in registry.method(name).models}
    if rollout_error_enabled(cfg):
        need |= set(ROLLOUT_ERROR_MODELS)
    return [m for m in registry.MODELS if m in need]


def _validated(cls_ref: str, data: dict | None, where: str) -> dict:
    return asdict(from_dict(registry.resolve(cls_ref), data or {}, where=where))


# ---- job specs -------------------------------------------------------------------------------

def generate_job(cfg: dict, family: str) -> dict:
    """Build a family's datasets locally: for locomotion one online SAC run yields every kind
    (`data.generate`); for maze2d D4RL's waypoint controller drives each maze (`data.maze2d`)."""
    data = cfg.get("data") or {}
    kinds = families(cfg)[family]
    settings = (("maze2d", "datagen.generate:Maze2dGenerateConfig") if family == "maze2d"
                else ("generate", "datagen.generate:GenerateConfig"))
    return {"step": "generate-datasets", "family": family, "kinds": kinds,
            "outputs": {k: str(path(cfg, "dataset", task=f"{family}-{k}")) for k in kinds},
            "out": str(path(cfg, "generated", family=family)),
            "config": {settings[0]: _validated(settings[1], data.get(settings[0]),
                                               f"data.{settings[0]}"),
                       "seed": data.get("seed", 0)}}


def source_name(cfg: dict, task: str) -> str:
    """The D4RL file name or Minari id a task is imported from: 'hopper-medium-v2',
    'mujoco/hopper/medium-v0', or its `data.files` path; maze2d: D4RL's 'maze2d-umaze-v1', Minari's
    'D4RL/pointmaze/umaze-v2' (versions: `data.d4rl_version` / `data.minari_version`, and
    `data.maze2d_d4rl_version` / `data.maze2d_minari_version` for the mazes)."""
    data = cfg.get("data") or {}
    family, kind = split_task(task)
    if task in data_files(cfg):
        return str(Path(data_files(cfg)[task]).expanduser())
    if family == "maze2d":
        if data_source(cfg) == "d4rl":
            return f"{task}-{data.get('maze2d_d4rl_version', 'v1')}"
        return f"D4RL/pointmaze/{kind}-{data.get('maze2d_minari_version', 'v2')}"
    if data_source(cfg) == "d4rl":
        return f"{task}-{data.get('d4rl_version', 'v2')}"
    return f"mujoco/{family}/{kind}-{data.get('minari_version', 'v0')}"


def import_job(cfg: dict, task: str) -> dict:
    """Read a task's dataset from D4RL's hdf5 files or a local Minari root."""
    data = cfg.get("data") or {}
    return {"step": "import-dataset", "task": task, "out": str(path(cfg, "dataset", task=task)),
            "config": {"source": data_source(cfg), "name": source_name(cfg, task),
                       "consistency": _validated("harness.data.consistency:ConsistencyConfig",
                                                 data.get("consistency"), "data.consistency")}}


def models_shared(cfg: dict) -> bool:
    """`models.shared_across_seeds`: one model of each kind per task for every seed (cheap; the
    confidence intervals then leave out model-training variance) instead of one per seed."""
    return bool((cfg.get("models") or {}).get("shared_across_seeds", False))


def model_seed(cfg: dict, task: str, seed: int) -> int:
    """The seed of the models a run of `seed` uses: its own, or `models.seed` when shared."""
    models = task_config(cfg, task).get("models") or {}
    return int(models.get("seed", 0)) if models_shared(cfg) else seed


def model_dirs(cfg: dict, models, task: str, seed: int) -> dict[str, str]:
    mseed = model_seed(cfg, task, seed)
    return {m: str(path(cfg, "model_dir", model=m, task=task, mseed=mseed)) for m in models}


def model_job(cfg: dict, model: str, task: str, mseed: int) -> dict:
    """Train one model of a task with model seed `mseed` (see `model_seed`)."""
    if model not in registry.MODELS:
        raise ConfigError(f"model: unknown model {model!r}; known: {list(registry.MODELS)}")
    models = task_config(cfg, task).get("models") or {}
    return {"step": "train-model", "model": model, "task": task, "seed": mseed,
            "dataset": str(path(cfg, "dataset", task=task)),
            "out": str(path(cfg, "model_dir", model=model, task=task, mseed=mseed)),
            "config": {"model": _validated(registry.MODELS[model].config, models.get(model),
                                           f"models.{model}"),
                       "seed": mseed}, **runtime(cfg, model)}


def policy_settings(cfg: dict, method: str, task: str) -> dict:
    """A method's training settings: the shared `policy` sections, then for the method and each
    method it is derived from (root first) its registry overrides (its per-task ones for
    `task` after) and its `policy.methods.<name>` section (+ the task's `per_task` overrides),
    validated. Only the method's own agent section is kept, so another agent's change reruns
    nothing."""
    spec = registry.method(method)
    policy = task_config(cfg, task).get("policy") or {}
    merged = {k: v for k, v in policy.items() if k != "methods"}
    for m in registry.lineage(method):
        section = (policy.get("methods") or {}).get(m.name, {})
        unknown = sorted(set(section) - {"offline", "rollout", *registry.AGENTS})
        if unknown:
            raise ConfigError(f"policy.methods.{m.name}: unknown key(s) {unknown}")
        merged = deep_merge(deep_merge(merged, m.overrides), m.per_task.get(task, {}))
        merged = deep_merge(merged, section)
    given = (policy.get("methods") or {}).get(method, {})
    rollout = merged.get("rollout") or {}
    where = f"policy.methods.{method}.rollout"
    if not spec.model_based:
        if rollout:
            raise ConfigError(f"{where}: {method} is model-free and takes no rollout settings")
    else:
        pinned = sorted(set(spec.pinned_rollout) & set(given.get("rollout") or {}))
        if pinned:
            raise ConfigError(f"{where}: {pinned} cannot be set: {method} is defined by "
                              f"{ {k: spec.pinned_rollout[k] for k in pinned} }")
        rollout = _validated(spec.rollout_config, {**rollout, **spec.pinned_rollout}, where)
    agent = registry.AGENTS[spec.agent]
    offline = _validated("harness.training.offline_loop:OfflineConfig", merged.get("offline"),
                         f"policy.methods.{method}.offline")
    agent_cfg = dict(merged.get(agent.name) or {})
    if agent_cfg.get("actor_lr_schedule", "constant") != "constant" \
            and agent_cfg.get("actor_lr_schedule_steps") is None:
        # A learning-rate schedule spans the method's training unless told otherwise.
        agent_cfg["actor_lr_schedule_steps"] = offline["total_steps"]
    return {"offline": offline,
            "agent": _validated(agent.config, agent_cfg, f"policy.methods.{method}.{agent.name}"),
            "rollout": rollout}


def policy_job(cfg: dict, method: str, task: str, seed: int) -> dict:
    spec = registry.method(method)
    return {"step": "train-policy", "method": method, "task": task, "seed": seed,
            "dataset": str(path(cfg, "dataset", task=task)),
            "model_dirs": model_dirs(cfg, spec.models, task, seed),
            "out": str(path(cfg, "policy_dir", method=method, task=task, seed=seed)),
            "config": {"policy": policy_settings(cfg, method, task), "seed": seed},
            **runtime(cfg, "policy", method)}


def eval_job(cfg: dict, method: str, task: str, seed: int) -> dict:
    """Final evaluation of a trained policy in the simulator (fresh episodes, own seed)."""
    evaluation = task_config(cfg, task).get("evaluation") or {}
    return {"step": "evaluate", "method": method, "task": task, "seed": seed,
            "policy_dir": str(path(cfg, "policy_dir", method=method, task=task, seed=seed)),
            "dataset": str(path(cfg, "dataset", task=task)),  # its sim_model attr: the dynamics
            "out": str(path(cfg, "eval", method=method, task=task, seed=seed)),
            "config": {"episodes": evaluation.get("final_episodes", 10),
                       "seed": 1_000_003 + seed}, **runtime(cfg, "evaluate", method)}


def rollout_error_job(cfg: dict, task: str) -> dict:
    """Generated vs simulator trajectories for one task (needs stored qpos/qvel). `runs`: one
    per model seed the study covers (rollout_error.model_seeds: `first`, the default, or `all`
    seeds of the grid), each with that seed's models and that seed's learning policy."""
    rcfg = task_config(cfg, task).get("rollout_error") or {}
    # The policy whose actions drive the study: TD3+BC's by default, else the first method's.
    default = "td3bc" if "td3bc" in cfg["methods"] else cfg["methods"][0]
    method = rcfg.get("policy_method", default)
    seeds = cfg["seeds"] if rcfg.get("model_seeds", "first") == "all" else cfg["seeds"][:1]
    runs = [{"seed": seed, "model_dirs": model_dirs(cfg, ROLLOUT_ERROR_MODELS, task, seed),
             "policy_dir": str(path(cfg, "policy_dir", method=method, task=task, seed=seed))}
            for seed in seeds]
    return {"step": "rollout-error", "task": task, "dataset": str(path(cfg, "dataset", task=task)),
            "runs": runs, "out": str(path(cfg, "rollout_error_dir", task=task)),
            "config": {"horizon": rcfg.get("horizon", 100), "n_starts": rcfg.get("n_starts", 64),
                       "seed": rcfg.get("seed", 0), "policy_method": method,
                       "injections": list(rcfg.get("injections") or []),
                       "fast_sampler": bool(rcfg.get("fast_sampler", False)),
                       "dydiff_rollout": _dydiff_rollout(cfg, task)},
            **runtime(cfg, "rollout_error")}


def _dydiff_rollout(cfg: dict, task: str) -> dict:
    """The study's "dydiff" model samples as the first DyDiff method of the grid trains (its
    rollout settings); {} = the generator's defaults when the grid runs none."""
    dydiff = [m for m in cfg["methods"]
              if registry.method(m).generator == registry.method("dydiff-td3bc").generator]
    return policy_settings(cfg, dydiff[0], task)["rollout"] if dydiff else {}


def eval_paths(cfg: dict) -> list[str]:
    return [str(path(cfg, "eval", method=m, task=t, seed=s))
            for m in cfg["methods"] for t in cfg["tasks"] for s in cfg["seeds"]]


def analysis_job(cfg: dict) -> dict:
    acfg = cfg.get("analysis") or {}
    rerr = ([str(path(cfg, "rollout_error_csv", task=t)) for t in cfg["tasks"]]
            if rollout_error_enabled(cfg) else [])
    return {"step": "analyze", "scores": eval_paths(cfg), "rollout_error": rerr,
            "datasets": {t: str(path(cfg, "dataset", task=t)) for t in cfg["tasks"]},
            "out": str(path(cfg, "analysis_dir")),
            "config": {"reps": acfg.get("reps", 2000), "seed": acfg.get("seed", 0),
                       "name": cfg["name"], "seeds": len(cfg["seeds"]),
                       "models_shared": models_shared(cfg),
                       "models": [m for m in registry.MODELS if any(
                           m in registry.method(name).models for name in cfg["methods"])],
                       "score_rule": acfg.get("score_rule", "final")}}


def all_jobs(cfg: dict, seeds: list[int] | None = None) -> list[dict]:
    """Every job of the grid, in DAG order (for validation, listings and tests)."""
    seeds = cfg["seeds"] if seeds is None else seeds
    out: list[dict] = []
    if data_source(cfg) == "local":
        out += [generate_job(cfg, f) for f in families(cfg)]
    else:
        out += [import_job(cfg, t) for t in cfg["tasks"]]
    for task in cfg["tasks"]:
        mseeds = sorted({model_seed(cfg, task, s) for s in seeds})
        out += [model_job(cfg, m, task, ms) for m in needed_models(cfg) for ms in mseeds]
        for method in cfg["methods"]:
            for seed in seeds:
                out += [policy_job(cfg, method, task, seed), eval_job(cfg, method, task, seed)]
        if rollout_error_enabled(cfg):
            out.append(rollout_error_job(cfg, task))
    out.append(analysis_job(cfg))
    return out


def job_for(cfg: dict, step: str, task: str | None = None, method: str | None = None,
            seed: int = 0, model: str | None = None) -> dict:
    """The spec of one job named by its step and coordinates (what the CLI runs by hand)."""
    needs = {"generate-datasets": ("task",), "import-dataset": ("task",),
             "train-model": ("task", "model"), "train-policy": ("task", "method"),
             "evaluate": ("task", "method"), "rollout-error": ("task",), "analyze": ()}
    given = {"task": task, "method": method, "model": model}
    missing = [f"--{k}" for k in needs.get(step, ()) if given[k] is None]
    if step not in needs:
        raise ConfigError(f"unknown step {step!r}; known: {list(needs)}")
    if missing:
        raise ConfigError(f"{step} needs {' and '.join(missing)}")
    if step == "generate-datasets":
        return generate_job(cfg, split_task(task)[0])
    if step == "import-dataset":
        return import_job(cfg, task)
    if step == "train-model":
        return model_job(cfg, model, task, model_seed(cfg, task, seed))
    if step == "train-policy":
        return policy_job(cfg, method, task, seed)
    if step == "evaluate":
        return eval_job(cfg, method, task, seed)
    if step == "rollout-error":
        return rollout_error_job(cfg, task)
    return analysis_job(cfg)


# ---- where jobs log --------------------------------------------------------------------------

def run_context(cfg: dict) -> dict:
    """Where a job logs: the MLflow experiment (= config name) and the results folder.

    The tracking URI is not part of a job spec (changing it must not rerun jobs): it comes
    from MLFLOW_TRACKING_URI, which the Snakefile sets from `mlflow.tracking_uri`, else the
    sqlite store under results_dir (harness.tracking.default_uri).
    """
    return {"experiment": cfg["name"], "results_dir": str(cfg.get("results_dir", "results"))}


def tracking_env(cfg: dict) -> dict[str, str]:
    """Environment for jobs: MLflow URI from the config (if given) and the on/off switch."""
    mlflow = cfg.get("mlflow") or {}
    env = {"DYDIFF_MLFLOW": "1" if mlflow.get("enabled", True) else "0"}
    if mlflow.get("tracking_uri"):
        env["MLFLOW_TRACKING_URI"] = mlflow["tracking_uri"]
    return env


def with_context(cfg: dict, spec: dict) -> dict:
    """A spec as a job receives it: its settings plus where it logs."""
    return {**copy.deepcopy(spec), **run_context(cfg)}


# ---- devices ---------------------------------------------------------------------------------
# A job's device is part of its spec (a change reruns it: CPU and CUDA numbers differ), outside
# "config" (its config hash stays the same). The rule asks the scheduler for `gpus(...)`.

def job_device(cfg: dict, kind: str, method: str | None = None) -> str:
    """cpu, cuda or cuda:N for a rule kind's job: `devices.per_method.<method>` (policy jobs),
    else `devices.<kind>`, else auto: cuda where `resources.<kind>.gpu` offers a GPU and, for a
    policy job, its method's registry entry asks for one (`Method.gpu`), else cpu."""
    devices = cfg.get("devices") or {}
    per_method = devices.get("per_method") or {}
    chosen = per_method.get(method) if kind == "policy" and method in per_method \
        else devices.get(kind, "auto")
    if chosen != "auto":
        return chosen
    wants = registry.method(method).gpu if kind == "policy" else True
    return "cuda" if _offered_gpus(cfg, kind) > 0 and wants else "cpu"


def _offered_gpus(cfg: dict, kind: str) -> int:
    """resources.<kind>.gpu (0 when absent)."""
    return int(((cfg.get("resources") or {}).get(kind) or {}).get("gpu", 0))


def gpus(cfg: dict, kind: str, method: str | None = None) -> int:
    """GPUs a rule kind's job asks the scheduler for: resources.<kind>.gpu (at least 1) when
    its device is CUDA, else 0 (a CPU job never holds a GPU)."""
    if not job_device(cfg, kind, method).startswith("cuda"):
        return 0
    return max(1, _offered_gpus(cfg, kind))


def runtime(cfg: dict, kind: str, method: str | None = None) -> dict:
    """What a job spec carries besides its config: its device, the determinism switch
    (`deterministic`, default on) and, when set away from their defaults, the speed levers its
    work uses (`levers`, harness/levers.py: a model job of the diffusion model its training's,
    a job that samples the diffusion model its sampler's, a policy job its agents')."""
    out = {"device": job_device(cfg, kind, method),
           "deterministic": bool(cfg.get("deterministic", True))}
    chosen = job_levers(cfg.get("levers"), levers_used(kind, method))
    return {**out, "levers": chosen} if chosen else out


def levers_used(kind: str, method: str | None = None) -> tuple[str, ...]:
    """The levers (harness.levers.Levers fields) a rule kind's job uses."""
    if kind == "diffusion":
        return USED_BY["diffusion"]
    if kind == "rollout_error":
        return USED_BY["sample"]
    if kind == "policy":
        samples = "diffusion" in registry.method(method).models
        return USED_BY["agents"] + (USED_BY["sample"] if samples else ())
    return ()


def _check_devices(cfg: dict) -> None:
    from harness.runtime import check_device_name
    devices = cfg.get("devices") or {}
    for kind, name in devices.items():
        if kind == "per_method":
            for method, mname in (name or {}).items():
                if method not in cfg["methods"]:
                    raise ConfigError(f"devices.per_method.{method}: not one of methods "
                                      f"{cfg['methods']}")
                check_device_name(mname, f"devices.per_method.{method}")
        elif name != "auto":
            check_device_name(name, f"devices.{kind}")
