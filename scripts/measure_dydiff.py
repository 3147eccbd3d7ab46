"""DyDiff measurements on one CPU thread (issue 5, "Numbers it must reach").

Stages (each cached in --out and resumable: rerunning skips finished work):
  data       hopper medium-replay generated locally (datagen.generate, short SAC run)
  reward     DyDiff reward model (paper defaults): holdout MSE vs reward variance
  diffusion  dynamics diffusion at a CPU preset (--diffusion-steps, --horizon)
  ensemble   probabilistic ensemble (baselines.ensemble, if present) on the same data
  policy     a briefly trained TD3+BC agent (deterministic; for the policy-mode curves)
  error      rollout error vs the MuJoCo simulator (behaviour actions, open loop; and the
             policy's actions): normalised state MSE at horizons 1, 10, 25, 50, 100 for the
             ensemble, the diffusion model alone and (with ensemble and reward model) the
             DyDiff generator (policy actions only), plus each model's action gap
             ||a_t - pi(s_t)|| along its policy-mode trajectories
  gap        action gap ||a_cond - pi(s_gen)|| of DiffusionDynamics.inject after 0/1/2
             injection iterations (diffusion / policy init, with and without state averaging)
Writes <out>/summary.json and <out>/summary.md (results/ is git-ignored), plus each stage's
outputs (<out>/error/rollout_error.csv/.png, model folders). Speed is measured separately by
  .venv/bin/python -m pytest tests/benchmarks/test_bench_diffusion.py --benchmark-enable
  --benchmark-only
Defaults take about 25 min on one thread (SAC data 4 min, diffusion 12 min, ensemble 5 min).

Usage:  OMP_NUM_THREADS=1 .venv/bin/python scripts/measure_dydiff.py [--stages data,reward,...]
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

log = logging.getLogger("measure_dydiff")
HORIZONS = (1, 10, 25, 50, 100)
STAGES = ("data", "reward", "diffusion", "ensemble", "policy", "error", "gap")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/measurements/dydiff"))
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sac-steps", type=int, default=30_000)
    p.add_argument("--medium-target", type=float, default=20.0)
    p.add_argument("--horizon", type=int, default=32, help="diffusion segment length")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--diffusion-steps", type=int, default=9000)
    p.add_argument("--diffusion-batch", type=int, default=64)
    p.add_argument("--sampler-steps", type=int, default=10)
    p.add_argument("--policy-steps", type=int, default=5000)
    p.add_argument("--ensemble-max-epochs", type=int, default=200)
    p.add_argument("--n-starts", type=int, default=256)
    p.add_argument("--error-horizon", type=int, default=100)
    return p.parse_args()


def load_summary(out: Path) -> dict:
    """All stages' results so far (one JSON per stage, so stages can run in parallel)."""
    return {name: json.loads((out / "stages" / f"{name}.json").read_text())
            for name in STAGES if (out / "stages" / f"{name}.json").exists()}


def save_stage(out: Path, name: str, summary: dict) -> None:
    from harness.checkpoint import atomic_write_text
    if name in summary:
        atomic_write_text(out / "stages" / f"{name}.json",
                          json.dumps(summary[name], indent=2, default=float))
    summary = {**load_summary(out), **summary}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=float))
    atomic_write_text(out / "summary.md", to_markdown(summary))


def dataset_path(args) -> Path:
    return args.out / "data" / "hopper-medium-replay.hdf5"


def stage_data(args, summary):
    from harness.config import from_dict
    from datagen.generate import GenerateConfig, generate_datasets
    from harness.data.sources import load_dataset
    if not dataset_path(args).exists():
        cfg = from_dict(GenerateConfig, {
            "sac_steps": args.sac_steps, "start_steps": 2000, "update_after": 1000,
            "n_transitions": 10_000, "medium_target": args.medium_target,
            "expert_target": max(60.0, args.medium_target + 1), "eval_every": 2500,
            "eval_episodes": 3, "checkpoint_every": 5000}, where="data.generate")
        generate_datasets("hopper", ["medium-replay"], cfg, args.out / "data", seed=args.seed)
    ds = load_dataset(str(dataset_path(args)))
    ds.name = "hopper-medium-replay"
    summary["data"] = {"transitions": len(ds), "episodes": len(ds.episodes()),
                       "normalized_return_mean": float(ds.normalized_returns().mean()),
                       "reward_mean": float(ds.rewards.mean()),
                       "reward_var": float(ds.rewards.var())}
    return ds


def diffusion_cfg(args) -> dict:
    return {"horizon": args.horizon, "dim": args.dim, "dim_mults": [1, 2, 4],
            "batch_size": args.diffusion_batch, "train_steps": args.diffusion_steps,
            "lr_rampup_kimg": 0.0, "ema_halflife_kimg": 10.0, "log_every": 200,
            "checkpoint_every": 1000, "sampler": {"num_steps": args.sampler_steps}}


def stage_reward(args, ds, summary):
    from dydiff.reward_model import train_reward_model
    s = train_reward_model(ds, {}, args.out / "reward", seed=args.seed, device="cpu")
    summary["reward"] = {**s, "holdout_mse_over_var": s["holdout_mse"] / s["holdout_reward_var"]}


def stage_diffusion(args, ds, summary):
    from dydiff.diffusion import train_diffusion
    summary["diffusion"] = {"config": diffusion_cfg(args), **train_diffusion(
        ds, diffusion_cfg(args), args.out / "diffusion", seed=args.seed, device="cpu")}


def stage_ensemble(args, ds, summary):
    try:
        from baselines.ensemble import DyDiffEnsembleConfig, train_ensemble
    except ImportError as err:
        log.warning("no ensemble (%s): skipping", err)
        return
    summary["ensemble"] = train_ensemble(ds, {"max_epochs": args.ensemble_max_epochs},
                                         args.out / "ensemble", seed=args.seed,
                                         device="cpu")
    # The one DyDiff's generator starts from: the authors' recipe (models.ensemble-dydiff).
    summary["ensemble-dydiff"] = train_ensemble(
        ds, DyDiffEnsembleConfig(max_epochs=args.ensemble_max_epochs),
        args.out / "ensemble-dydiff", seed=args.seed, device="cpu")


def stage_policy(args, ds, summary):
    from harness.config import from_dict
    from harness.training.policy import PolicyConfig, train_policy
    cfg = from_dict(PolicyConfig, {"offline": {
        "total_steps": args.policy_steps, "eval_every": args.policy_steps, "eval_episodes": 5,
        "log_every": 500, "checkpoint_every": 1000}}, where="policy")
    summary["policy"] = train_policy("td3bc", ds, cfg, args.out / "td3bc", seed=args.seed)


class ConstantModel:
    """Predicts a constant state (or the start state when `state` is None) at every step."""

    def __init__(self, state):
        self.state = None if state is None else torch.as_tensor(state, dtype=torch.float32)

    def open_loop(self, start_obs, actions):
        n, h = actions.shape[:2]
        s = start_obs if self.state is None else self.state.expand(n, -1)
        return s[:, None].expand(n, h, -1)


def one_step_by_start(args, ds) -> dict:
    """Diffusion 1-step error (same metric, dataset next states as truth) split by whether the
    start has a full window (horizon - 1 behaviour actions) left in its episode: training
    windows only start where a full window fits (as in the authors' indexer), so starts near an
    episode end are never window starts in training."""
    from analysis.rollout_error import behaviour_actions, select_starts
    from dydiff.diffusion import load_diffusion
    dyn = load_diffusion(args.out / "diffusion", "cpu")
    starts = select_starts(ds, args.n_starts, np.random.default_rng(args.seed))
    acts, valid = behaviour_actions(ds, starts, dyn.horizon - 1)
    torch.manual_seed(args.seed)
    states, _ = dyn.sample(torch.as_tensor(ds.observations[starts]), torch.as_tensor(acts))
    sigma = ds.observations.std(0) + 1e-6
    err = (((states[:, 1].numpy() - ds.next_observations[starts]) / sigma) ** 2).mean(-1)
    full = valid.all(1)
    return {"full_window": float(err[full].mean()), "n_full": int(full.sum()),
            "near_episode_end": float(err[~full].mean()) if (~full).any() else float("nan"),
            "n_near_end": int((~full).sum())}


def stage_error(args, ds, summary):
    from analysis.rollout_error import run_rollout_error
    dirs = {"diffusion": args.out / "diffusion"}
    if (args.out / "ensemble" / "model.pt").exists():
        dirs["ensemble"] = args.out / "ensemble"
    policy = args.out / "td3bc" / "policy.pt"
    reward = args.out / "reward"
    # The DyDiff generator (DyDiffConfig defaults: ensemble start) needs its ensemble, the
    # reward model and a policy to act with.
    dydiff_ensemble = args.out / "ensemble-dydiff"
    dydiff = ((dydiff_ensemble / "model.pt").exists() and (reward / "model.pt").exists()
              and policy.exists())
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)  # diffusion sampling draws from the global stream
    res = run_rollout_error(ds, dirs, args.out / "error", horizon=args.error_horizon,
                            n_starts=args.n_starts, seed=args.seed,
                            policy=policy if policy.exists() else None, reps=1000,
                            reward_dir=reward if dydiff else None,
                            dydiff={} if dydiff else None,
                            dydiff_ensemble_dir=dydiff_ensemble if dydiff else None)
    # Reference predictors on the same starts (same seed -> same rows): what an
    # uninformative model scores, to read the learned models' numbers against.
    from analysis.rollout_error import rollout_error_study
    refs = rollout_error_study(ds, {"ref:dataset-mean": ConstantModel(ds.observations.mean(0)),
                                    "ref:hold-start": ConstantModel(None)},
                               horizon=args.error_horizon, n_starts=args.n_starts,
                               seed=args.seed, reps=0, progress=False)
    df = pd.concat([res["rollout_error"], refs])
    table = {}
    for (mode, model), g in df.groupby(["mode", "model"]):
        g = g.set_index("horizon")
        table[f"{mode}/{model}"] = {
            str(h): {"state_mse": float(g.state_mse[h]), "lo": float(g.state_mse_lo[h]),
                     "hi": float(g.state_mse_hi[h]), "n_valid": int(g.n_valid[h]),
                     "action_gap": float(g.action_gap[h])}
            for h in HORIZONS if h in g.index}
    summary["error"] = {"horizon": args.error_horizon, "n_starts": args.n_starts,
                        "models": sorted(dirs) + (["dydiff"] if dydiff else []),
                        "curves": table,
                        "diffusion_one_step_by_start": one_step_by_start(args, ds),
                        "wall_time": time.perf_counter() - t0}


def stage_gap(args, ds, summary):
    from dydiff.diffusion import load_diffusion
    from harness.training.policy import load_agent
    dyn = load_diffusion(args.out / "diffusion", "cpu")
    agent = load_agent(args.out / "td3bc" / "policy.pt")
    rng = np.random.default_rng(args.seed)
    start = torch.as_tensor(ds.observations[rng.choice(len(ds), 256, replace=False)])
    # Scale reference: how far apart two typical policy actions are.
    with torch.no_grad():
        pi = agent.act(start, deterministic=True)
    ref = float((pi - pi[torch.randperm(len(pi), generator=torch.Generator().manual_seed(0))])
                .norm(dim=-1).mean())
    out = {"n_starts": 256, "policy_action_spread": ref}
    for init in ("diffusion", "policy"):
        for avg in (True, False):
            torch.manual_seed(args.seed)
            gaps = dyn.inject(start, agent, iterative_times=2, average_states=avg,
                              init=init)["action_gap"]
            out[f"init={init},average_states={avg}"] = {f"k={k}": g for k, g in enumerate(gaps)}
    summary["gap"] = out


def to_markdown(s: dict) -> str:
    lines = ["# DyDiff measurements (hopper medium-replay, generated locally, 1 CPU thread)", ""]
    if "data" in s:
        d = s["data"]
        lines += [f"Data: {d['transitions']} transitions, {d['episodes']} episodes, behaviour "
                  f"normalised return {d['normalized_return_mean']:.1f}, reward var "
                  f"{d['reward_var']:.3f}.", ""]
    if "reward" in s:
        r = s["reward"]
        lines += [f"Reward model (paper defaults): holdout MSE {r['holdout_mse']:.4g} = "
                  f"{100 * r['holdout_mse_over_var']:.2f}% of the holdout reward variance; "
                  f"{r['steps']} steps ({r['epochs']:.0f} epochs, early stopped: "
                  f"{r['early_stopped']}), {r['wall_time_s']:.0f} s.", ""]
    if "diffusion" in s:
        d = s["diffusion"]
        lines += [f"Diffusion: {d['config']}, {d['parameters']} parameters, {d['steps']} steps, "
                  f"final loss {d['final_loss']:.4f}, {d['wall_time_s']:.0f} s.", ""]
    if "ensemble" in s:
        e = s["ensemble"]
        lines += [f"Ensemble (MBPO/MOPO defaults): {e['epochs']} epochs, elite holdout MSE "
                  f"{e['holdout_mse_elites']:.4g} (state dims {e['holdout_obs_mse_elites']:.4g}; "
                  f"trivial next=current {e['holdout_obs_mse_trivial']:.4g}), "
                  f"{e['wall_time_s']:.0f} s.", ""]
    if "policy" in s:
        p = s["policy"]
        lines += [f"TD3+BC: {p.get('steps')} steps, normalised score "
                  f"{p.get('normalized_score', float('nan')):.1f}.", ""]
    if "error" in s:
        e = s["error"]
        hs = sorted({h for c in e["curves"].values() for h in map(int, c)})
        lines += [f"Rollout error vs simulator: normalised state MSE (obs-std units^2), "
                  f"{e['n_starts']} starts, mean [95% CI] (n valid)", "",
                  "| mode/model | " + " | ".join(f"h={h}" for h in hs) + " |",
                  "|---" * (len(hs) + 1) + "|"]
        for name, c in e["curves"].items():
            cells = [f"{c[str(h)]['state_mse']:.3g} [{c[str(h)]['lo']:.3g}, "
                     f"{c[str(h)]['hi']:.3g}] ({c[str(h)]['n_valid']})"
                     if str(h) in c else "" for h in hs]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        gaps = {name: c for name, c in e["curves"].items()
                if any(np.isfinite(v.get("action_gap", np.nan)) for v in c.values())}
        if gaps:
            lines += ["", "Action gap mean ||a_t - pi(s_t)|| along the policy-mode "
                      "trajectories (a_t: the action each transition was generated with)", "",
                      "| mode/model | " + " | ".join(f"h={h}" for h in hs) + " |",
                      "|---" * (len(hs) + 1) + "|"]
            for name, c in gaps.items():
                lines.append(f"| {name} | " + " | ".join(
                    f"{c[str(h)]['action_gap']:.3g}" if str(h) in c else "" for h in hs) + " |")
        d = e.get("diffusion_one_step_by_start")
        if d:
            lines += ["", f"Diffusion 1-step error by start: {d['full_window']:.3g} with a full "
                      f"window left in the episode (n={d['n_full']}), {d['near_episode_end']:.3g} "
                      f"within horizon - 1 steps of the episode end (n={d['n_near_end']})."]
        lines.append("")
    if "gap" in s:
        g = s["gap"]
        lines += [f"Action gap mean ||a_cond - pi(s_gen)|| over {g['n_starts']} starts x "
                  f"horizon (policy action spread {g['policy_action_spread']:.3f}):", "",
                  "| setting | k=0 | k=1 | k=2 |", "|---|---|---|---|"]
        for key, v in g.items():
            if isinstance(v, dict):
                lines.append(f"| {key} | " + " | ".join(f"{v[f'k={k}']:.4f}" for k in range(3))
                             + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # the machine is shared
    stages = args.stages.split(",")
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; known: {list(STAGES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    summary = load_summary(args.out)
    ds = stage_data(args, summary)
    save_stage(args.out, "data", summary)
    for name in stages[1:] if stages[0] == "data" else stages:
        if name == "data":
            continue
        t0 = time.perf_counter()
        globals()[f"stage_{name}"](args, ds, summary)
        log.info("stage %s done in %.0f s", name, time.perf_counter() - t0)
        save_stage(args.out, name, summary)
    print(to_markdown(load_summary(args.out)))


if __name__ == "__main__":
    main()
