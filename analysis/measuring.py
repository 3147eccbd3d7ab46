"""Measuring: one work item timed on this machine (`measure`), with the real classes at the
job's settings (untrained weights: cost does not depend on them), on the device it names.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import date

from analysis.pricing import JobCost, machine, missing_items
from analysis.work_items import Item, _settings
from harness import registry
from harness.config import from_dict

# Start states timed per rollout call on a CPU: enough to amortise per-call overhead, few enough
# that a paper-size diffusion call (its cost is linear in the starts) takes seconds, not minutes.
# On a GPU a call is timed at the job's own rollout_batch_size (a small batch is launch-bound).
MEASURE_BATCH = {"rollout": 32, "rollout-large": 4, "ensemble-rollout": 4096}
LARGE_DENOISER = 5_000_000  # parameters

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
    if _measure_device.startswith("cuda"):
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
    """One gradient step as dydiff.diffusion.train_diffusion takes it on the measuring device:
    the network, its EMA copy (no gradients) and the segments there, the fused Adam."""
    from dydiff.diffusion import DiffusionConfig, build_denoiser, make_optimizer, train_step
    from dydiff.segments import make_segments
    cfg = from_dict(DiffusionConfig, s["config"], where="models.diffusion")
    segments = make_segments(_synthetic_dataset_dims(s, 3000), cfg.horizon, kind=cfg.normalizer,
                             padding=cfg.padding).to(_measure_device)
    d = s["obs_dim"] + s["act_dim"]
    net = _on(build_denoiser(cfg, d))
    ema = _on(build_denoiser(cfg, d)).requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    opt = make_optimizer(net.parameters(), cfg)
    net.train()
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
    """Seconds per start state of one generator call (`rollout_starts` of them).

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
        n = rollout_starts(s["rollout"], params > LARGE_DENOISER)
        cfg = from_dict(DyDiffConfig, {**s["rollout"], "rollout_batch_size": n},
                        where="policy.rollout")
        limits = Limits(*(_on(x) for x in (-torch.ones(o) * 5, torch.ones(o) * 5,
                                           -torch.ones(a), torch.ones(a))))
        _rollout_sampler(models["diffusion"], cfg)
        gen = DyDiffGenerator(models["diffusion"], _reward_fn(models["reward"]), done_fn, cfg,
                              ensemble=models.get(ENSEMBLE), limits=limits)
    else:
        from baselines.mopo import EnsembleRolloutGenerator, as_config
        n = rollout_starts(s["rollout"], False, ensemble=True)
        cfg = as_config({**s["rollout"], "rollout_batch_size": n})
        gen = EnsembleRolloutGenerator(models["ensemble"], done_fn, cfg, seed=0)
    start = _on(torch.randn(n, o, generator=torch.Generator().manual_seed(0)))
    if _measure_device.startswith("cuda"):  # first use of each kernel (cuDNN, cuBLAS) untimed
        gen.generate(agent, start[:8])
    return _timed(lambda: gen.generate(agent, start), repeats=3) / n


def _rollout_sampler(dyn, cfg) -> None:
    """The sampler a job's generator runs (dydiff.rollout.make_generator: a preset named in
    policy.rollout.sampler, keeping the model's batch size, then sampler_steps)."""
    import dataclasses
    from dydiff.sampler import sampler_config
    if cfg.sampler is not None:
        dyn.sampler = dataclasses.replace(sampler_config(cfg.sampler),
                                          batch_size=dyn.sampler.batch_size)
    if cfg.sampler_steps is not None:
        dyn.sampler = dataclasses.replace(dyn.sampler, num_steps=cfg.sampler_steps)


def rollout_starts(rollout: dict, large: bool, ensemble: bool = False) -> int:
    """Start states of one timed generator call: the job's rollout_batch_size on a GPU (a
    smaller batch is launch-bound there: the per-start cost would be many times the job's),
    capped by MEASURE_BATCH on a CPU (the cost is linear in the starts there)."""
    job = rollout.get("rollout_batch_size", 50_000 if ensemble else 2048)
    if _measure_device.startswith("cuda"):
        return job
    return min(job, MEASURE_BATCH["ensemble-rollout" if ensemble else
                                  "rollout-large" if large else "rollout"])


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

