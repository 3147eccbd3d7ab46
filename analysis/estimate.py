"""What a grid will cost before it runs: `dydiff-bench estimate --configfile config/paper.yaml` (cli: harness/cli.py).

Every job of the plan is broken into *work items*, each a count of one measured unit:

    train-policy   agent updates (total_steps) + rollout start states (one per trajectory of
                   each generator call) + evaluation env steps (every eval_every steps)
    train-model    diffusion / reward gradient steps; ensemble minibatches (epochs x rows/batch)
    generate       online SAC env steps + updates, then rollout env steps per dataset kind;
                   maze2d: transitions of D4RL's waypoint controller
    evaluate       env steps of the final evaluation episodes
    rollout-error  start states of the study's models + simulator env steps
    analyze        bootstrap replications over the grid's runs
    every job      a fixed start-up (interpreter, torch, MLflow imports) and its MLflow run

A unit's seconds come from `THROUGHPUT_FILE`, a table of measurements kept in the repository
(one row per item and settings: machine, threads, date and the command that measured it).
`--measure` times every item the grid needs that the table lacks, on this machine, with the
real classes at the job's settings (untrained weights: cost does not depend on them), and adds
rows. Counts are upper bounds where the run decides (episodes and model rollouts that end
early, early stopping: then `ASSUMED_EPOCHS`). Wall time is a list schedule of the DAG on the
profile's parallelism.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import heapq
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from harness import plan, registry
from harness.config import ConfigError, from_dict

THROUGHPUT_FILE = Path(__file__).resolve().parent / "throughput.csv"  # package data
COLUMNS = ("item", "key", "seconds", "unit", "device", "threads", "machine", "date", "command",
           "settings")
# Epochs assumed for models that train until early stopping (no train_steps / max_epochs).
ASSUMED_EPOCHS = {"ensemble": 200, "reward": 100}
# Transitions of D4RL's -v2 / maze2d -v1 files, for datasets not on disk yet (D4RL paper, App. C).
D4RL_ROWS = {"random": 1_000_000, "medium": 1_000_000, "expert": 1_000_000,
             "medium-expert": 2_000_000, "medium-replay": {"hopper": 402_000,
                                                           "halfcheetah": 202_000,
                                                           "walker2d": 302_000},
             "umaze": 1_000_000, "medium-maze": 2_000_000, "large": 4_000_000}
# Start states timed per rollout call: enough to amortise per-call overhead, few enough that a
# paper-size diffusion call (its cost is linear in the starts) takes seconds, not minutes.
MEASURE_BATCH = {"rollout": 32, "rollout-large": 4, "ensemble-rollout": 4096}
LARGE_DENOISER = 5_000_000  # parameters


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


# ---- resources of a job (the Snakefile's rules read the same config keys) --------------------

RULE_OF_STEP = {"generate-datasets": "generate_datasets", "import-dataset": "import_dataset",
                "train-model": "train_model", "train-policy": "train_policy",
                "evaluate": "evaluate", "rollout-error": "rollout_error", "analyze": "analyze"}


def job_resources(cfg: dict, spec: dict) -> tuple[int, bool]:
    """(threads, runs on a GPU) of a job: threads from `resources:` as workflow/rules/*.smk
    read them, the device the plan gave the job (harness.plan.job_device)."""
    res = cfg.get("resources") or {}
    kind = {"train-model": spec.get("model"), "train-policy": "policy",
            "rollout-error": "rollout_error"}.get(spec["step"])
    gpu = str(spec.get("device", "cpu")).startswith("cuda")
    if kind is None:
        return 1, gpu
    threads = (res.get(kind) or {}).get("threads", 1) if spec["step"] != "rollout-error" else 1
    return int(threads), gpu


# ---- the throughput table --------------------------------------------------------------------

def machine(device: str = "cpu") -> str:
    """'x86_64, 2 CPUs, <CPU model>' (no host names), with ', <GPU name>' for a GPU row."""
    if device != "cpu":
        import torch
        return f"{machine()}, {torch.cuda.get_device_name(0)}"
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {model}".rstrip(", ")


def read_table(path: Path = THROUGHPUT_FILE) -> list[dict]:
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(row for row in f if not row.startswith("#")))
    for row in rows:
        try:
            row["seconds"], row["threads"] = float(row["seconds"]), int(row["threads"])
            # The key is recomputed from the row's settings: a setting declared cost-free
            # later (COST_FREE) leaves the rows measured before it findable.
            row["key"] = settings_key(json.loads(row["settings"]))
        except (KeyError, ValueError) as err:
            raise ConfigError(f"{path}: bad row {row}: {err}") from None
    return rows


def write_table(rows: list[dict], path: Path = THROUGHPUT_FILE) -> None:
    from harness.checkpoint import atomic_path
    header = ("# Measured seconds per unit of work (analysis/estimate.py). One row per item and "
              "settings (key = hash of settings); add rows with\n# `dydiff-bench estimate "
              "--configfile <config> --measure` on the machine they describe.\n")
    rows = sorted(rows, key=lambda r: (r["item"], r["device"], r["threads"], r["key"]))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        f.write(header)
        w = csv.DictWriter(f, COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows({k: r[k] for k in COLUMNS} for r in rows)


# Work that runs on the CPU in a GPU job too (MuJoCo, start-up, MLflow, the analysis): priced
# from CPU rows whatever the job's device.
CPU_ITEMS = {"env-step", "job-start", "job-tracking", "maze2d-generate", "analysis-rep",
             "analysis-fixed"}


def item_device(it: Item, job_device: str) -> str:
    return "cpu" if it.name in CPU_ITEMS else job_device


def lookup(rows: list[dict], it: Item, device: str, threads: int) -> dict | None:
    """The table's row for an item: same settings and device, the nearest thread count."""
    key = it.key
    same = [r for r in rows if r["item"] == it.name and r["key"] == key and r["device"] == device]
    return min(same, key=lambda r: (abs(r["threads"] - threads), r["date"]), default=None)


# ---- measuring one item ----------------------------------------------------------------------

# The device `measure` times an item on (cpu, or cuda on a GPU machine).
_measure_device = "cpu"


def _on(x):
    """A module, tensor or dict of tensors on the measuring device."""
    if isinstance(x, dict):
        return {k: _on(v) for k, v in x.items()}
    return x.to(_measure_device)


def _timed(fn, repeats: int, warmup: int = 1, slow: float = 5.0) -> float:
    """Median seconds of fn() over `repeats` calls after `warmup` calls; a call slower than
    `slow` seconds is timed once (paper-size items would otherwise take minutes). On a GPU each
    call is waited for (CUDA runs asynchronously)."""
    if _measure_device != "cpu":
        import torch
        inner = fn

        def fn():
            inner()
            torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > slow:
        return first
    for _ in range(warmup - 1):
        fn()
    times = [first] if warmup == 0 else []
    for _ in range(repeats - len(times)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _agent(agent: str, agent_cfg: dict, obs_dim: int, act_dim: int):
    spec = registry.AGENTS[agent]
    cfg = from_dict(registry.resolve(spec.config), agent_cfg, where=f"policy.{agent}")
    return registry.resolve(spec.cls)(obs_dim, act_dim, cfg)


def _batch(n: int, obs_dim: int, act_dim: int):
    import torch
    g = torch.Generator().manual_seed(0)
    return {"obs": torch.randn(n, obs_dim, generator=g),
            "actions": torch.rand(n, act_dim, generator=g) * 2 - 1,
            "rewards": torch.randn(n, generator=g), "next_obs": torch.randn(n, obs_dim, generator=g),
            "terminals": torch.zeros(n)}


def _measure_agent_update(s: dict) -> float:
    agent = _on(_agent(s["agent"], s["config"], s["obs_dim"], s["act_dim"]))
    batch = _on(_batch(s["batch"], s["obs_dim"], s["act_dim"]))
    return _timed(lambda: agent.update(batch), repeats=7, warmup=2)


def _measure_env_step(s: dict) -> float:
    import numpy as np
    from harness.envs import make_env, task_spec
    from harness.training.evaluation import evaluate
    spec = task_spec(s["task"])
    if s["agent"] == "none":  # plain simulator steps (dataset import's consistency replay)
        env = make_env(s["task"], seed=0)
        env.reset(seed=0)
        rng = np.random.default_rng(0)
        acts = rng.uniform(-1, 1, (500, spec.act_dim))

        def run():
            for a in acts:
                if any(env.step(a)[2:4]):
                    env.reset()
        return _timed(run, repeats=3) / len(acts)
    agent = _agent(s["agent"], {}, spec.obs_dim, spec.act_dim)
    steps = []

    def run():
        steps.append(sum(evaluate(agent, s["task"], episodes=4, seed=0)["lengths"]))
    seconds = _timed(run, repeats=3)
    return seconds / steps[-1]


def _measure_diffusion_train(s: dict) -> float:
    import torch
    from dydiff.diffusion import DiffusionConfig, build_denoiser, train_step
    from dydiff.segments import make_segments
    cfg = from_dict(DiffusionConfig, s["config"], where="models.diffusion")
    segments = make_segments(_synthetic_dataset_dims(s, 3000), cfg.horizon)
    d = s["obs_dim"] + s["act_dim"]
    net, ema = build_denoiser(cfg, d), build_denoiser(cfg, d)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    step = iter(range(10**9))
    return _timed(lambda: train_step(net, ema, opt, segments, next(step), cfg), repeats=5)


def _synthetic_dataset_dims(s: dict, n: int):
    import numpy as np
    from harness.data.dataset import Dataset
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(n, s["obs_dim"])).astype(np.float32)
    timeouts = np.zeros(n, bool)
    timeouts[199::200] = True
    return Dataset(obs, rng.uniform(-1, 1, (n, s["act_dim"])).astype(np.float32),
                   rng.normal(size=n).astype(np.float32), np.roll(obs, -1, 0),
                   np.zeros(n, bool), timeouts, name="hopper-estimate")


def _measure_ensemble_train(s: dict) -> float:
    import torch
    from baselines.ensemble import (EnsembleConfig, EnsembleNet, ensemble_loss,
                                    make_optimizer, target_dim)
    cfg = from_dict(EnsembleConfig, s["config"], where="models.ensemble")
    o, a = s["obs_dim"], s["act_dim"]
    net = _on(EnsembleNet(o + a, target_dim(cfg, o), cfg))
    opt = make_optimizer(net, cfg)
    g = torch.Generator().manual_seed(0)
    x = _on(torch.randn(cfg.num_members, cfg.batch_size, o + a, generator=g))
    y = _on(torch.randn(cfg.num_members, cfg.batch_size, target_dim(cfg, o), generator=g))

    def step():
        loss = ensemble_loss(net, x, y, cfg.logvar_loss_coef)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return _timed(step, repeats=20, warmup=3)


def _measure_reward_train(s: dict) -> float:
    import torch
    from dydiff.reward_model import RewardModel, RewardModelConfig
    cfg = from_dict(RewardModelConfig, s["config"], where="models.reward")
    o, a = s["obs_dim"], s["act_dim"]
    model = _on(RewardModel(o, a, cfg.hidden))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batch = _on(_batch(cfg.batch_size, o, a))

    def step():
        loss = (model.standardized(batch["obs"], batch["actions"]) - batch["rewards"]).square()
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        opt.step()
    return _timed(step, repeats=20, warmup=3)


def _untrained_models(s: dict):
    """Untrained ensemble, reward model and diffusion model at the job's settings."""
    from baselines.ensemble import EnsembleConfig, EnsembleDynamics, EnsembleNet, target_dim
    o, a = s["obs_dim"], s["act_dim"]
    models = s["models"]
    out = {}
    for name in ("ensemble", "ensemble-dydiff"):  # MOPO / MBPO's; DyDiff's start-state one
        if name in models:
            ecfg = from_dict(EnsembleConfig, models[name], where=f"models.{name}")
            out[name] = EnsembleDynamics(EnsembleNet(o + a, target_dim(ecfg, o), ecfg),
                                         list(range(ecfg.num_elites)), o, a, "estimate",
                                         device=_measure_device)
    if "reward" in models:
        from dydiff.reward_model import RewardModel
        out["reward"] = _on(RewardModel(o, a, models["reward"]["hidden"]).eval())
    if "diffusion" in models:
        from dydiff.diffusion import DiffusionConfig, build_denoiser
        from dydiff.sampler import DiffusionDynamics
        from dydiff.segments import make_segments
        dcfg = from_dict(DiffusionConfig, models["diffusion"], where="models.diffusion")
        segments = make_segments(_synthetic_dataset_dims(s, 3000), dcfg.horizon)
        out["diffusion"] = DiffusionDynamics(build_denoiser(dcfg, o + a), segments.normalizer,
                                             o, a, dcfg.horizon, dcfg.sampler,
                                             device=_measure_device)
    return out


def _measure_rollout(s: dict) -> float:
    """Seconds per start state of one generator call (a call of MEASURE_BATCH starts).

    Rollouts never terminate here: the untrained models' states are noise, on which a task's
    termination ends most rows at the first step (hopper's made its calls ~5x cheaper than
    halfcheetah's), while a trained model's rows mostly live the whole horizon. Every row
    running the whole horizon is the upper bound the estimate's other counts take too."""
    import torch
    from harness.envs import TERMINATION_FNS
    o, a = s["obs_dim"], s["act_dim"]
    agent = _on(_agent(s["agent"], s["agent_config"], o, a))
    models = _untrained_models(s)
    done_fn = TERMINATION_FNS["halfcheetah"]  # never terminates (non-finite states only)
    if "diffusion" in models:
        from dydiff.rollout import ENSEMBLE, DyDiffConfig, DyDiffGenerator, _reward_fn
        from dydiff.sampler import Limits
        params = sum(p.numel() for p in models["diffusion"].denoiser.parameters())
        n = min(s["rollout"].get("rollout_batch_size", 2048),
                MEASURE_BATCH["rollout-large" if params > LARGE_DENOISER else "rollout"])
        cfg = from_dict(DyDiffConfig, {**s["rollout"], "rollout_batch_size": n},
                        where="policy.rollout")
        limits = Limits(*(_on(x) for x in (-torch.ones(o) * 5, torch.ones(o) * 5,
                                           -torch.ones(a), torch.ones(a))))
        gen = DyDiffGenerator(models["diffusion"], _reward_fn(models["reward"]), done_fn, cfg,
                              ensemble=models.get(ENSEMBLE), limits=limits)
    else:
        from baselines.mopo import EnsembleRolloutGenerator, as_config
        n = min(s["rollout"].get("rollout_batch_size", 50_000), MEASURE_BATCH["ensemble-rollout"])
        cfg = as_config({**s["rollout"], "rollout_batch_size": n})
        gen = EnsembleRolloutGenerator(models["ensemble"], done_fn, cfg, seed=0)
    start = _on(torch.randn(n, o, generator=torch.Generator().manual_seed(0)))
    return _timed(lambda: gen.generate(agent, start), repeats=3) / n


def _measure_analysis(s: dict, reps: int) -> float:
    import numpy as np
    import pandas as pd
    from analysis.aggregate import aggregate, improvement_probabilities, performance_profiles
    rng = np.random.default_rng(0)
    rows = [{"method": m, "task": f"t{t}", "seed": k,
             "normalized_score": float(rng.uniform(0, 100))}
            for m in s["methods"] for t in range(s["tasks"]) for k in range(s["seeds"])]
    df = pd.DataFrame(rows)

    def run():
        aggregate(df, reps=reps)
        performance_profiles(df, reps=reps)
        improvement_probabilities(df, reps=reps)
    return _timed(run, repeats=1, warmup=0)


def _measure_maze2d_generate(s: dict) -> float:
    from datagen.maze2d import maze2d_dataset
    n = 3000
    return _timed(lambda: maze2d_dataset(s["task"], n, seed=0), repeats=1, warmup=0) / n


def _measure_job_tracking(s: dict) -> float:
    """A job's own MLflow run, as a fresh job process meets it (first connection to an
    existing sqlite store, params, tags, a metric, an artefact): a process doing that, less
    one that only imports (`job-start`)."""
    import tempfile
    from harness import tracking
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        tracking.init_store(uri, "estimate")
        code = (f"{IMPORTS}\nfrom pathlib import Path\nfrom harness import tracking\n"
                f"out = Path({tmp!r}) / 'job'; out.mkdir(exist_ok=True)\n"
                f"(out / 'final.json').write_text('{{}}')\n"
                f"with tracking.job_run(experiment='estimate', run_name='job', "
                f"params={{f'p{{i}}': i for i in range(60)}}, tags={{'step': 'estimate'}}, "
                f"out_dir=out, uri={uri!r}, artifacts=lambda: [out / 'final.json']) as log:\n"
                f"    log({{'loss': 1.0}}, 0)\n")
        with_run = _timed(lambda: subprocess.run([sys.executable, "-c", code], check=True,
                                                 capture_output=True), repeats=3)
    return max(with_run - _measure_job_start(s), 0.0)


IMPORTS = "import torch, mlflow, gymnasium, pandas, harness.runner"


def _measure_job_start(s: dict) -> float:
    cmd = [sys.executable, "-c", IMPORTS]
    def run():
        subprocess.run(cmd, check=True, capture_output=True)
    return _timed(run, repeats=3, warmup=1)


def _measure_analysis_rep(s: dict) -> float:
    """Per replication: the difference of two runs, so the fixed part cancels."""
    return max(_measure_analysis(s, 1200) - _measure_analysis(s, 200), 0.0) / 1000


# item -> (how to time one unit, the unit)
MEASURES = {
    "agent-update": (_measure_agent_update, "update"),
    "env-step": (_measure_env_step, "env step"),
    "diffusion-train": (_measure_diffusion_train, "gradient step"),
    "ensemble-train": (_measure_ensemble_train, "minibatch"),
    "reward-train": (_measure_reward_train, "gradient step"),
    "rollout": (_measure_rollout, "start state"),
    "analysis-rep": (_measure_analysis_rep, "bootstrap rep"),
    "analysis-fixed": (lambda s: 15.0,
                       "job (tables, figures, summary: not timed, a fixed allowance)"),
    "maze2d-generate": (_measure_maze2d_generate, "transition"),
    "job-start": (_measure_job_start, "job"),
    "job-tracking": (_measure_job_tracking, "job"),
}


def measure(it: Item, device: str = "cpu") -> tuple[float, str]:
    """(seconds per unit, unit) of an item, timed here on `device` (cpu, cuda) with the current
    torch thread count."""
    global _measure_device
    if it.name not in MEASURES:
        raise ValueError(f"no measurement for work item {it.name!r}")
    fn, unit = MEASURES[it.name]
    _measure_device = device
    try:
        return fn(_settings(it)), unit
    finally:
        _measure_device = "cpu"


# ---- the estimate ----------------------------------------------------------------------------

@dataclass
class JobCost:
    """A job's expected seconds on its own device (`seconds`; None for a GPU job whose items
    have no GPU rows yet) and the same job timed with CPU rows (`cpu_seconds`)."""
    spec: dict
    seconds: float | None
    cpu_seconds: float
    threads: int
    gpu: bool
    missing: list[Item]          # items with no CPU row (the estimate cannot go on without)
    missing_gpu: list[Item]      # items of a GPU job with no GPU row (priced "not measured")

    @property
    def wall_seconds(self) -> float:
        """For the schedule: its own device's time, else the CPU timing (an upper bound)."""
        return self.seconds if self.seconds is not None else self.cpu_seconds


def plan_costs(cfg: dict, rows: list[dict], threads: int | None = None) -> list[JobCost]:
    """Every job of the grid with its expected seconds (missing items add nothing)."""
    out = []
    for spec in plan.all_jobs(cfg):
        job_threads, gpu = job_resources(cfg, spec)
        own, on_cpu, missing, missing_gpu = 0.0, 0.0, [], []
        for it in job_items(cfg, spec):
            cpu_row = lookup(rows, it, "cpu", threads or job_threads)
            if cpu_row is None:
                missing.append(it)
            else:
                on_cpu += cpu_row["seconds"] * it.count
            device = item_device(it, "cuda" if gpu else "cpu")
            row = cpu_row if device == "cpu" else lookup(rows, it, device,
                                                         threads or job_threads)
            if row is None:
                (missing_gpu if gpu and it.name not in CPU_ITEMS else missing).append(it)
            else:
                own += row["seconds"] * it.count
        out.append(JobCost(spec, None if missing_gpu else own, on_cpu, job_threads, gpu,
                           list(dict.fromkeys(missing)), missing_gpu))
    return out


def missing_items(costs: list[JobCost], gpu: bool = False) -> dict[tuple[str, str], Item]:
    return {(it.name, it.key): it for c in costs
            for it in (c.missing_gpu if gpu else c.missing)}


def measure_missing(costs: list[JobCost], rows: list[dict], threads: int, command: str,
                    log=print, device: str = "cpu", only: dict | None = None) -> list[dict]:
    """Time every item the table lacks on `device` (cpu: the CPU rows; cuda: the GPU jobs'
    rows), or the items `only`, with `threads` torch threads; return the new rows."""
    import torch
    torch.set_num_threads(threads)
    new = []
    todo = missing_items(costs, gpu=device != "cpu") if only is None else only
    for i, it in enumerate(todo.values(), 1):
        t0 = time.perf_counter()
        seconds, unit = measure(it, device)
        log(f"  [{i}/{len(todo)}] {it.name} {it.key} on {device}: {seconds:.4g} s per {unit} "
            f"(measured in {time.perf_counter() - t0:.1f} s)")
        new.append({"item": it.name, "key": it.key, "seconds": seconds, "unit": unit,
                    "device": device, "threads": threads, "machine": machine(device),
                    "date": date.today().isoformat(), "command": command,
                    "settings": json.dumps(_settings(it), sort_keys=True)})
    return new


def _deps(costs: list[JobCost]) -> list[list[int]]:
    """Indices of the jobs whose outputs each job reads (paths in the specs)."""
    producer: dict[str, int] = {}
    for i, c in enumerate(costs):
        spec = c.spec
        for p in [spec.get("out"), *(spec.get("outputs") or {}).values()]:
            if p:
                producer[str(p)] = i
    deps = []
    for c in costs:
        spec = c.spec
        inputs = [spec.get("dataset"), spec.get("policy_dir"),
                  *(spec.get("model_dirs") or {}).values(), *(spec.get("scores") or []),
                  *(spec.get("rollout_error") or [])]
        found = set()
        for p in filter(None, inputs):
            p = str(p)
            j = producer.get(p)
            if j is None:  # a file inside a job's out folder (rollout_error.csv, eval.json)
                j = next((producer[q] for q in (str(Path(p).parent),) if q in producer), None)
            if j is not None:
                found.add(j)
        deps.append(sorted(found))
    return deps


def schedule(costs: list[JobCost], slots: int, by_threads: bool) -> float:
    """Wall seconds of a list schedule: jobs start in DAG order as soon as their inputs exist
    and capacity is free. `by_threads`: a job takes its threads out of `slots` cores (local);
    else one of `slots` job slots (a cluster queue)."""
    deps = _deps(costs)
    need = [min(c.threads, slots) if by_threads else 1 for c in costs]
    left = [len(d) for d in deps]
    users: list[list[int]] = [[] for _ in costs]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    ready = [i for i, n in enumerate(left) if n == 0]
    running: list[tuple[float, int]] = []
    now, free = 0.0, slots
    done = 0
    while done < len(costs):
        ready.sort()
        started = []
        for i in ready:
            if need[i] <= free:
                free -= need[i]
                heapq.heappush(running, (now + costs[i].wall_seconds, i))
                started.append(i)
        ready = [i for i in ready if i not in set(started)]
        if not running:
            raise RuntimeError("estimate: the job graph has a cycle or a job larger than the "
                               "capacity")
        now, i = heapq.heappop(running)
        free += need[i]
        done += 1
        for u in users[i]:
            left[u] -= 1
            if left[u] == 0:
                ready.append(u)
    return now


def parallelism(profile: str | None, cores: int | None, jobs: int | None) -> tuple[int, bool]:
    """(slots, by_threads): --jobs N job slots (cluster), else the profile's `jobs` (slurm),
    else --cores (default: this machine's CPUs) shared by the jobs' threads (local)."""
    if jobs:
        return jobs, False
    if profile:
        prof = Path(__file__).resolve().parent.parent / "workflow" / "profiles" / profile \
            / "config.yaml"
        if not prof.exists():
            raise ConfigError(f"--profile {profile}: no {prof.relative_to(prof.parents[3])}")
        import yaml
        data = yaml.safe_load(prof.read_text()) or {}
        if "jobs" in data:
            return int(data["jobs"]), False
    return cores or os.cpu_count() or 1, True


def fmt_hours(seconds: float) -> str:
    h = seconds / 3600
    return f"{h:,.1f}" if h >= 10 else f"{h:.2f}"


def fmt_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def report(cfg: dict, costs: list[JobCost], slots: int, by_threads: bool, rows: list[dict],
           config_name: str) -> str:
    """The per-rule table, totals, wall time and the assumptions behind them. CPU-hours are the
    CPU jobs' (seconds x threads); GPU-hours the GPU jobs' from GPU rows, or "not measured" where
    the table has none, with the same jobs timed on CPU in a column of their own."""
    rules: dict[str, dict] = {}
    for c in costs:
        r = rules.setdefault(RULE_OF_STEP[c.spec["step"]],
                             {"jobs": 0, "gpu_jobs": 0, "cpu": 0.0, "gpu": 0.0, "gpu_on_cpu": 0.0,
                              "unmeasured": 0, "max": 0.0})
        r["jobs"] += 1
        r["max"] = max(r["max"], c.wall_seconds)
        if not c.gpu:
            r["cpu"] += c.seconds * c.threads
            continue
        r["gpu_jobs"] += 1
        r["gpu_on_cpu"] += c.cpu_seconds
        if c.seconds is None:
            r["unmeasured"] += 1
        else:
            r["gpu"] += c.seconds

    def gpu_cell(r) -> str:
        if not r["gpu_jobs"]:
            return "-"
        return "not measured" if r["unmeasured"] else fmt_hours(r["gpu"])

    def on_cpu_cell(r) -> str:
        return fmt_hours(r["gpu_on_cpu"]) if r["gpu_jobs"] else "-"
    total = {k: sum(r[k] for r in rules.values()) for k in next(iter(rules.values()))}
    wall = schedule(costs, slots, by_threads)
    lines = [f"Estimate for {config_name} ({len(costs)} jobs, {total['gpu_jobs']} on a GPU)", "",
             "| rule | jobs | GPU jobs | CPU-hours | GPU-hours | GPU jobs timed on CPU (hours) "
             "| longest job |", "|---|---|---|---|---|---|---|"]
    for name, r in rules.items():
        lines.append(f"| {name} | {r['jobs']} | {r['gpu_jobs']} | {fmt_hours(r['cpu'])} | "
                     f"{gpu_cell(r)} | {on_cpu_cell(r)} | {fmt_duration(r['max'])} |")
    lines.append(f"| **total** | {len(costs)} | {total['gpu_jobs']} | {fmt_hours(total['cpu'])} "
                 f"| {gpu_cell(total)} | {on_cpu_cell(total)} | |")
    where = (f"{slots} cores shared by the jobs' threads" if by_threads
             else f"{slots} jobs at once")
    lines += ["", f"Wall time with {where}: {fmt_duration(wall)} (the DAG's list schedule"
              + ("; GPU jobs without GPU rows at their CPU timing" if total["unmeasured"] else "")
              + ").", ""]
    # Each job's items once, then a lookup (matching every row against items recomputed per
    # row made this line quadratic: most of the paper estimate's time).
    keys = {(it.name, it.key) for c in costs for it in job_items(cfg, c.spec)}
    used = {(r["machine"], r["device"], r["threads"], r["date"]) for r in rows
            if (r["item"], r["key"]) in keys}
    lines.append("Throughputs from " + "; ".join(
        f"{m} ({dev}, {t} thread{'s' if t > 1 else ''}, {d})"
        for m, dev, t, d in sorted(used)) + ".")
    if total["gpu_jobs"]:
        lines.append(f"{total['gpu_jobs']} jobs run on a GPU (harness.plan.job_device: "
                     "devices.<kind>, resources.<kind>.gpu, the method's registry entry); MuJoCo, "
                     "start-up and MLflow are priced from CPU rows in them too.")
    if total["unmeasured"]:
        lines.append(f"{total['unmeasured']} of them have no GPU measurements in the table: their "
                     "GPU-hours are not measured (run `dydiff-bench estimate --configfile "
                     f"{config_name} --measure` on a GPU machine, or scripts/gpu_check.sh); the "
                     "column beside gives the same jobs timed on CPU.")
    threads_note = {c.threads for c in costs} - {r["threads"] for r in rows}
    if threads_note:
        lines.append(f"Jobs configured with {sorted(threads_note)} threads are timed at the "
                     "table's nearest thread count.")
    lines.append("Counts are upper bounds where the run decides: evaluation episodes at full "
                 "length; model rollouts that never terminate; models that train until early "
                 "stopping at "
                 + ", ".join(f"{k} {v} epochs" for k, v in ASSUMED_EPOCHS.items()) + ".")
    return "\n".join(lines)


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def estimate(cfg: dict, *, config_name: str, profile: str | None = None,
             cores: int | None = None, jobs: int | None = None, measure_missing_items=False,
             table: Path = THROUGHPUT_FILE, threads: int = 1, command: str = "",
             log=print) -> str:
    rows = read_table(table)
    costs = plan_costs(cfg, rows)
    missing = missing_items(costs)
    if missing and measure_missing_items:
        log(f"measuring {len(missing)} work item(s) on this machine's CPU ({threads} thread(s)):")
        rows += measure_missing(costs, rows, threads, command, log)
        write_table(rows, table)
        costs = plan_costs(cfg, rows)
        missing = missing_items(costs)
    missing_gpu = missing_items(costs, gpu=True)
    if missing_gpu and measure_missing_items and _cuda_available():
        log(f"measuring {len(missing_gpu)} work item(s) of the GPU jobs on this machine's GPU:")
        rows += measure_missing(costs, rows, threads, command, log, device="cuda")
        write_table(rows, table)
        costs = plan_costs(cfg, rows)
    if missing:
        names = sorted({f"{it.name} ({it.key})" for it in missing.values()})
        raise ConfigError(f"{table.name} has no measurement for {len(names)} work item(s) of "
                          f"this grid: {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}"
                          f"; add them with `dydiff-bench estimate --configfile {config_name} "
                          f"--measure` (times each on this machine)")
    slots, by_threads = parallelism(profile, cores, jobs)
    return report(cfg, costs, slots, by_threads, rows, config_name)
