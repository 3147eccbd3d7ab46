"""Work items: every job of a plan broken into counts of measured units (analysis/estimate.py
says which units each step has). An item's key hashes the settings that change its work.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass

from harness import plan, registry
from harness.config import ConfigError

# Epochs assumed for models that train until early stopping (no train_steps / max_epochs).
ASSUMED_EPOCHS = {"ensemble": 200, "reward": 100}
# Transitions of D4RL's -v2 / maze2d -v1 files, for datasets not on disk yet (D4RL paper, App. C).
D4RL_ROWS = {"random": 1_000_000, "medium": 1_000_000, "expert": 1_000_000,
             "medium-expert": 2_000_000, "medium-replay": {"hopper": 402_000,
                                                           "halfcheetah": 202_000,
                                                           "walker2d": 302_000},
             "umaze": 1_000_000, "medium-maze": 2_000_000, "large": 4_000_000}


@dataclass(frozen=True)
class Item:
    """`count` units of one measured kind of work (`name` with its cost-relevant settings)."""
    name: str
    settings: tuple  # sorted (key, json value) pairs: hashable
    count: float

    @functools.cached_property
    def key(self) -> str:
        return settings_key(_settings(self))


def settings_key(settings: dict) -> str:
    """Hash of the settings that change the work (not learning rates, coefficients...)."""
    blob = json.dumps(_cost_settings(settings), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def item(name: str, settings: dict, count: float) -> Item:
    return Item(name, tuple(sorted((k, json.dumps(v, sort_keys=True))
                                   for k, v in settings.items())), float(count))


def _settings(it: Item) -> dict:
    return {k: json.loads(v) for k, v in it.settings}


# ---- jobs -> work items ----------------------------------------------------------------------

def _dims(task: str) -> dict:
    from harness.envs import task_spec
    spec = task_spec(task)
    return {"obs_dim": spec.obs_dim, "act_dim": spec.act_dim}


def _env_item(task: str, agent: str, steps: float) -> Item:
    """Simulator steps of a task family (every locomotion dataset of a family shares one env)."""
    from harness.envs import family_of
    family = family_of(task)
    return item("env-step", {"task": task if family == "maze2d" else f"{family}-medium",
                             "agent": agent}, steps)


def _episode_steps(task: str) -> int:
    from harness.envs import task_spec
    return task_spec(task).max_episode_steps


def dataset_rows(cfg: dict, task: str) -> int:
    """Transitions of a task's dataset: the file if it exists, else what will be generated
    (`data.generate.n_transitions`; medium-expert twice that), else D4RL's size."""
    path = plan.path(cfg, "dataset", task=task)
    if path.exists():
        import h5py
        with h5py.File(path, "r") as f:
            return int(f["rewards"].shape[0])
    family, kind = plan.split_task(task)
    if plan.data_source(cfg) == "local":
        settings = plan.generate_job(cfg, family)["config"]
        if family == "maze2d":
            return settings["maze2d"]["n_transitions"][kind.removesuffix("-dense")]
        n = settings["generate"]["n_transitions"]
        return 2 * n if kind == "medium-expert" else n
    kind = kind.removesuffix("-dense") if family == "maze2d" else kind
    rows = D4RL_ROWS.get(kind if family != "maze2d" or kind != "medium" else "medium-maze",
                         1_000_000)
    return rows[family] if isinstance(rows, dict) else rows


# Settings that change numbers but not the work of an update (learning rates, coefficients,
# bounds): left out of a work item's key so tasks differing only in them share a measurement.
COST_FREE = {"actor_lr", "critic_lr", "alpha_lr", "cql_alpha_lr", "cql_log_alpha_init", "gamma",
             "tau", "alpha", "obs_std_eps", "cql_weight", "target_entropy", "alpha_max",
             "max_action", "noise_clip", "policy_noise", "bc_weight", "log_std_min",
             "log_std_max", "actor_lr_schedule_steps", "actor_lr_schedule_every",
             "lagrange_threshold", "temperature", "log_alpha_clamp", "normalize_reward",
             "weight_init", "lr", "weight_decay", "threshold", "temp", "penalty_coef",
             "sigma_data", "seed", "filter", "score", "rollout_batch_size",
             # Diffusion-QL (agents/diffql.py): coefficients, clipping, schedules, EMA, init
             "eta", "grad_norm", "ema_decay", "step_start_ema", "update_ema_every",
             "reward_tune", "lr_decay", "lr_decay_every", "lr_decay_t_max", "critic_init",
             "beta_schedule",
             # DyDiff's authors' settings (issue 26): the same work per step / sample; the
             # sampler's float64 updates are elementwise next to a float32 network (measured
             # in docs/performance.md: within noise at the paper size, 2-9 % at the smoke's)
             "action_cond_prob", "loss_form", "padding", "condition_churn", "dtype",
             "clip_range", "keep_rule", "zscore_eps", "prob_floor", "real_batch_rule", "keep",
             # the DyDiff authors' ensemble recipe (models.ensemble-dydiff): the same
             # minibatch work (without a reward head: one output of o + 1 fewer); its start
             # step reads one elite's mean instead of the elites' average
             "target_space", "weight_decay_form", "member_loss", "learned_logvar_bounds",
             "reward_head", "start_step"}


def _cost_settings(d: dict) -> dict:
    return {k: _cost_settings(v) if isinstance(v, dict) else v for k, v in d.items()
            if k not in COST_FREE}


def _agent_item(agent: str, agent_cfg: dict, batch: int, dims: dict, count: float) -> Item:
    return item("agent-update", {"agent": agent, "config": agent_cfg,
                                 "batch": batch, **dims}, count)


def _rollout_items(method: str, rollout: dict, models: dict, agent: str, agent_cfg: dict,
                   dims: dict, starts: float) -> list[Item]:
    spec = registry.method(method)
    return [item("rollout", {"generator": spec.generator, "rollout": rollout,
                             "models": models, "agent": agent, "agent_config": agent_cfg,
                             **dims}, starts)]


def _model_configs(cfg: dict, task: str, names) -> dict:
    return {m: plan.model_job(cfg, m, task, 0)["config"]["model"] for m in sorted(names)}


def _policy_items(cfg: dict, spec: dict) -> list[Item]:
    task, method = spec["task"], spec["method"]
    dims = _dims(task)
    settings = spec["config"]["policy"]
    off, agent_cfg = settings["offline"], settings["agent"]
    agent = registry.method(method).agent
    out = [_agent_item(agent, agent_cfg, off["batch_size"], dims, off["total_steps"])]
    evals = math.ceil(off["total_steps"] / off["eval_every"])
    out.append(_env_item(task, agent, evals * off["eval_episodes"] * _episode_steps(task)))
    if registry.method(method).model_based:
        calls = math.ceil(off["total_steps"] / off["rollout_freq"])
        rollout = settings["rollout"]
        models = _model_configs(cfg, task, registry.method(method).models)
        out += _rollout_items(method, rollout, models, agent, agent_cfg, dims,
                              calls * rollout["rollout_batch_size"])
    return out


def _model_items(cfg: dict, spec: dict) -> list[Item]:
    model, task, mcfg = spec["model"], spec["task"], spec["config"]["model"]
    dims = _dims(task)
    rows = dataset_rows(cfg, task)
    if model == "diffusion":
        return [item("diffusion-train", {"config": _without(mcfg, "train_steps", "log_every",
                                                            "checkpoint_every", "sampler"),
                                         **dims}, mcfg["train_steps"])]
    train_rows = rows - min(int(rows * mcfg["holdout_ratio"]), mcfg["max_holdout"])
    batches = math.ceil(train_rows / mcfg["batch_size"])
    if registry.MODELS[model].train == registry.MODELS["ensemble"].train:  # ensemble-dydiff too
        epochs = mcfg["max_epochs"] or ASSUMED_EPOCHS["ensemble"]
        return [item("ensemble-train", {"config": _without(mcfg, "max_epochs", "patience",
                                                           "log_every", "checkpoint_every"),
                                        **dims}, epochs * batches)]
    if model == "reward":
        steps = mcfg["train_steps"] or ASSUMED_EPOCHS["reward"] * batches
        return [item("reward-train", {"config": _without(mcfg, "train_steps", "patience",
                                                         "checkpoint_every", "eval_every"),
                                      **dims}, steps)]
    raise ConfigError(f"estimate: no cost model for model {model!r}")


def _without(d: dict, *keys) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def _generate_items(cfg: dict, spec: dict) -> list[Item]:
    if spec["family"] == "maze2d":  # D4RL's waypoint controller, one stream per maze
        sizes = spec["config"]["maze2d"]["n_transitions"]
        return [item("maze2d-generate", {"task": f"maze2d-{kind}"},
                     sizes[kind.removesuffix("-dense")]) for kind in spec["kinds"]]
    gen, family = spec["config"]["generate"], spec["family"]
    task = f"{family}-{spec['kinds'][0]}"
    dims = _dims(task)
    policy_kinds = [k for k in spec["kinds"] if k != "random"]
    kinds_rows = len(spec["kinds"]) + ("medium-expert" in spec["kinds"])
    out = [_env_item(task, "sac", gen["n_transitions"] * kinds_rows)]
    if policy_kinds:
        updates = max(gen["sac_steps"] - gen["update_after"], 0) * gen["updates_per_step"]
        out += [_agent_item("sac", gen["sac"], gen["batch_size"], dims, updates),
                _env_item(task, "sac", gen["sac_steps"] + gen["sac_steps"] // gen["eval_every"]
                          * gen["eval_episodes"] * _episode_steps(task))]
    return out


def _rollout_error_items(cfg: dict, spec: dict) -> list[Item]:
    task, c = spec["task"], spec["config"]
    dims = _dims(task)
    models = _model_configs(cfg, task, plan.ROLLOUT_ERROR_MODELS)
    horizon = models["diffusion"]["horizon"]
    windows = math.ceil(c["horizon"] / (horizon - 1))
    agent = registry.method(c["policy_method"]).agent
    agent_cfg = plan.policy_settings(cfg, c["policy_method"], task)["agent"]
    rollout = c["dydiff_rollout"] or {}
    runs = len(spec["runs"])  # one per model seed, from the same starts
    # Priced in DyDiff generator calls (the measured "rollout" item: an ensemble start and K
    # diffusion samples, K = iterative_times) per start and window. Diffusion samples per
    # start: 1 open loop; policy mode: 1 + K (init diffusion, the default "diffusion" row) or,
    # with rollout_error.injections, 1 + k per row; K for "dydiff"; the ensemble rows and the
    # ensemble start are cheap next to a sample.
    k = max(rollout.get("iterative_times", 2), 1)
    injected = sum(1 + i for i in c.get("injections") or []) or 1 + k
    calls = (1 + injected + k) / k
    out = [*_rollout_items("dydiff-td3bc", rollout, models, agent, agent_cfg, dims,
                           calls * windows * c["n_starts"] * runs),
           _env_item(task, agent, 2 * c["horizon"] * c["n_starts"] * runs)]
    if c.get("fast_sampler"):
        fast = {**rollout, "sampler": "fast", "sampler_steps": None}
        out += _rollout_items("dydiff-td3bc", fast, models, agent, agent_cfg, dims,
                              windows * c["n_starts"] * runs)
    return out


def _analysis_items(cfg: dict, spec: dict) -> list[Item]:
    shape = {"methods": cfg["methods"], "tasks": len(cfg["tasks"]), "seeds": len(cfg["seeds"])}
    return [item("analysis-rep", shape, spec["config"]["reps"]),
            item("analysis-fixed", shape, 1)]


def _import_items(cfg: dict, spec: dict) -> list[Item]:
    rows = spec["config"]["consistency"].get("rows", 2000)
    return [_env_item(spec["task"], "none", rows)]


ITEMS = {"train-policy": _policy_items, "train-model": _model_items,
         "generate-datasets": _generate_items, "evaluate": None,
         "rollout-error": _rollout_error_items, "analyze": _analysis_items,
         "import-dataset": _import_items}


# Every job: the process's start-up (imports) and its own MLflow run.
JOB_FIXED = [item("job-start", {}, 1), item("job-tracking", {}, 1)]


def job_items(cfg: dict, spec: dict) -> list[Item]:
    step = spec["step"]
    if step == "evaluate":
        agent = registry.method(spec["method"]).agent
        return [_env_item(spec["task"], agent,
                          spec["config"]["episodes"] * _episode_steps(spec["task"])),
                *JOB_FIXED]
    return ITEMS[step](cfg, spec) + JOB_FIXED

