"""DyDiff sampler study (issue 16): speed and accuracy of faster EDM samplers vs the authors'.

For each sampler candidate (CANDIDATES: solver, steps, churn, warm start), with the DyDiff
generator's settings (dydiff/rollout.py DyDiffConfig defaults: ensemble start, K = 2 injections,
state averaging, clipping):
  * network evaluations per generated trajectory (one window of horizon - 1 transitions, the K
    injections included), counted on the denoiser;
  * generated transitions/s of `DyDiffGenerator.generate` (ensemble start, injections, reward
    model, filter; transitions counted before the filter) on one thread, at three network
    sizes: the trained CPU model of scripts/measure_dydiff.py, and untrained networks of the
    smoke and paper shapes (tests/benchmarks/test_bench_diffusion.py PRESETS; speed only);
  * accuracy on the trained CPU model (hopper medium-replay, generated locally): normalised
    state MSE vs the MuJoCo simulator at h = 10 / 50 / 100 with the policy's actions, and the
    action gap ||a_t - pi(s_t)||, through analysis.rollout_error.rollout_error_study as
    measure_dydiff's `error` stage calls it (same starts and torch seed for every candidate),
    plus per-start paired differences to the authors' sampler with a bootstrap 95 % CI.
"authors-reseed" is the authors' sampler again with another torch seed: the spread a
different noise draw alone causes. "authors-k1" / "ensemble-k0" are references with fewer
injections (K = 1; K = 0: the ensemble's rollout itself), not candidates: a faster sampler
whose numbers sit there has, in effect, dropped injections.

Selection: the fastest candidate (paper-size transitions/s) (1) with >= 5x the authors' at
the paper and the CPU size, (2) whose paired difference to the authors' (error at h = 10, 50,
100, error averaged over steps 1..100, action gap averaged over steps) has a CI lower bound
<= 0, i.e. it is not significantly worse anywhere, and (3) whose mean error is closer to the
authors' than to the K = 1 reference: on this data fewer injections alone lower the error
(the ensemble start weighs more), so (2) alone would also pass a sampler that has, in effect,
dropped an injection. The `fast` preset (dydiff/sampler.py SAMPLER_PRESETS) is that choice;
the report also names the pick of (1) and (2) alone.

Models come from scripts/measure_dydiff.py's output folder (--models); missing ones are
(re)created by calling its stages. Writes results/measurements/sampler/sampler_study.{md,csv,json}
and prints the Markdown.

Usage:  OMP_NUM_THREADS=1 .venv/bin/python scripts/sampler_study.py [--n-starts 256]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

log = logging.getLogger("sampler_study")
HS = (10, 50, 100)

# name -> SamplerConfig fields that differ from the authors' (its defaults).
DPM = {"solver": "dpmpp2m", "num_steps": 10, "S_churn": 0.0}
SDE = {**DPM, "solver": "dpmpp2m_sde"}
CANDIDATES: dict[str, dict] = {
    "authors": {},
    "authors-reseed": {},
    "heun-det-34": {"S_churn": 0.0},
    "heun-stoch-10": {"num_steps": 10},
    "heun-det-10": {"num_steps": 10, "S_churn": 0.0},
    "dpmpp2m-10": DPM,
    "dpmpp2m-6": {**DPM, "num_steps": 6},
    "dpmpp2m-sde-10": SDE,
    "dpmpp2m-sde-10-warm1": {**SDE, "warm_start": True, "warm_sigma": 1.0},
    "dpmpp2m-10-warm1": {**DPM, "warm_start": True, "warm_sigma": 1.0},
    "dpmpp2m-10-warm0.3": {**DPM, "warm_start": True, "warm_sigma": 0.3},
    "dpmpp2m-10-warm1-first": {**DPM, "warm_start": True, "warm_sigma": 1.0,
                               "warm_first": True},
    # References, not candidates (another K): what fewer injections alone do to the error.
    "authors-k1": {},
    "ensemble-k0": {},
}
ROLLOUT = {"authors-k1": {"iterative_times": 1}, "ensemble-k0": {"iterative_times": 0}}
RESEED = {"authors-reseed": 1}  # candidate -> offset added to the torch seed
NOT_CANDIDATES = {"authors", "authors-reseed", *ROLLOUT}

SPEED_PRESETS = {  # tests/benchmarks/test_bench_diffusion.py PRESETS (network shape only)
    "smoke": {"horizon": 16, "dim": 32, "dim_mults": [1, 2]},
    "paper": {},
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", type=Path, default=Path("results/measurements/dydiff"),
                   help="scripts/measure_dydiff.py's --out (models are made there if absent)")
    p.add_argument("--out", type=Path, default=Path("results/measurements/sampler"))
    p.add_argument("--candidates", default=",".join(CANDIDATES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-starts", type=int, default=256, help="starts for the error study")
    p.add_argument("--error-horizon", type=int, default=100)
    p.add_argument("--reps", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--speed-starts", type=int, default=256,
                   help="trajectories per generation: CPU model and smoke size")
    p.add_argument("--paper-starts", type=int, default=8,
                   help="trajectories per generation at the paper size")
    p.add_argument("--speed-repeats", type=int, default=2,
                   help="timed generations per candidate and size (the fastest counts); "
                        "1 at the paper size")
    p.add_argument("--skip-paper", action="store_true", help="no paper-size timing")
    return p.parse_args()


# ---- models -----------------------------------------------------------------------------

def ensure_models(models: Path, seed: int):
    """The dataset and the trained models of measure_dydiff (its stages run for the missing
    ones, with its defaults). Returns (dataset, model_dirs, policy path)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import measure_dydiff as md
    argv, sys.argv = sys.argv, ["measure_dydiff.py", "--out", str(models), "--seed", str(seed)]
    try:
        margs = md.parse_args()
    finally:
        sys.argv = argv
    models.mkdir(parents=True, exist_ok=True)
    summary = md.load_summary(models)
    ds = md.stage_data(margs, summary)
    md.save_stage(models, "data", summary)
    outputs = {"reward": "reward/model.pt", "diffusion": "diffusion/model.pt",
               "ensemble": "ensemble-dydiff/model.pt", "policy": "td3bc/policy.pt"}
    for stage, rel in outputs.items():
        if not (models / rel).exists():
            log.info("%s missing: running measure_dydiff stage %r", models / rel, stage)
            getattr(md, f"stage_{stage}")(margs, ds, summary)
            md.save_stage(models, stage, summary)
    dirs = {m: models / m for m in ("diffusion", "ensemble-dydiff", "reward")}
    return ds, dirs, models / outputs["policy"]


def sampler_of(name: str):
    from dydiff.sampler import sampler_config
    return sampler_config(CANDIDATES[name], where=f"candidate {name}")


def generator(ds, dirs, name: str, rollout: dict | None = None):
    """The DyDiff generator (DyDiffConfig defaults) with candidate `name`'s sampler."""
    from dydiff.rollout import make_generator
    gen = make_generator(ds, {**(rollout or {}), **ROLLOUT.get(name, {})}, dirs, "cpu")
    gen.dynamics.sampler = sampler_of(name)
    return gen


def untrained_generator(ds, dirs, preset: str, name: str, n: int):
    """A generator whose diffusion network has the preset's shape and random weights (speed
    only), with the trained ensemble, reward model and normaliser."""
    from harness.config import from_dict
    from dydiff.diffusion import DiffusionConfig, build_denoiser
    from dydiff.rollout import DyDiffGenerator
    from dydiff.sampler import DiffusionDynamics
    trained = generator(ds, dirs, name, {"rollout_batch_size": n})
    cfg = from_dict(DiffusionConfig, SPEED_PRESETS[preset], where=f"speed preset {preset}")
    torch.manual_seed(0)
    o, a = ds.obs_dim, ds.act_dim
    dyn = DiffusionDynamics(build_denoiser(cfg, o + a), trained.dynamics.normalizer, o, a,
                            cfg.horizon, sampler_of(name))
    return DyDiffGenerator(dyn, trained.reward_fn, trained.done_fn, trained.cfg,
                           trained.ensemble, trained.limits)


# ---- speed --------------------------------------------------------------------------------

def time_generation(gen, agent, start: torch.Tensor, repeats: int, seed: int) -> dict:
    """Fastest of `repeats` calls of gen.generate: transitions per second (before the filter)
    of this process's CPU time (one thread: what wall time is on an idle machine, and not
    inflated by other jobs on a shared one; wall time is kept too) and the denoiser calls per
    generation (= network evaluations per trajectory: one batch)."""
    calls = [0]
    hook = gen.dynamics.denoiser.register_forward_pre_hook(
        lambda *_: calls.__setitem__(0, calls[0] + 1))
    cpu, wall = float("inf"), float("inf")
    try:
        for _ in range(repeats):
            torch.manual_seed(seed)
            calls[0] = 0
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.inference_mode():
                gen.generate(agent, start)
            cpu = min(cpu, time.process_time() - c0)
            wall = min(wall, time.perf_counter() - t0)
    finally:
        hook.remove()
    chunks = -(-len(start) // gen.dynamics.sampler.batch_size)
    transitions = len(start) * gen.length
    return {"cpu_seconds": cpu, "wall_seconds": wall, "transitions": transitions,
            "transitions_per_s": transitions / cpu, "nfe_per_trajectory": calls[0] // chunks}


# ---- accuracy -----------------------------------------------------------------------------

class Seeded:
    """A rollout model that reseeds torch before rolling out (same noise stream for every
    candidate) and keeps its last output for the paired statistics."""

    def __init__(self, model, seed: int):
        self.model, self.seed, self.out, self.seconds = model, seed, None, float("nan")

    def policy_rollout(self, start_obs, agent, H: int) -> dict:
        torch.manual_seed(self.seed)
        t0 = time.perf_counter()
        self.out = self.model.policy_rollout(start_obs, agent, H)
        self.seconds = time.perf_counter() - t0
        return self.out


def per_start(ds, agent, models: dict[str, Seeded], args):
    """Per start and step: state error vs the simulator, its validity mask, and the action
    gap, computed as analysis.rollout_error does (same starts, same normalisation)."""
    from analysis.rollout_error import (SimulatorModel, _to_np, action_gap, select_starts,
                                        start_states)
    from harness.envs import alive_mask
    starts = select_starts(ds, args.n_starts, np.random.default_rng(args.seed))
    sim = SimulatorModel(ds.name, ds)
    qpos, qvel = start_states(ds, starts, sim)
    truth = sim.simulate(qpos, qvel, agent=agent, horizon=args.error_horizon)
    sigma = ds.observations.std(0).astype(np.float64) + 1e-6
    mask = alive_mask(truth["terminals"])
    out = {}
    for name, m in models.items():
        nxt = _to_np(m.out["next_obs"])
        err = (((nxt - truth["next_obs"]) / sigma) ** 2).mean(-1)
        gap = action_gap(agent, m.out["obs"], m.out.get("cond_actions", m.out["actions"]))
        out[name] = {"err": err, "gap": gap}
    return out, mask


def paired(values: dict, mask: np.ndarray, ref: str, reps: int, seed: int, hs) -> dict:
    """Candidate - reference per start, mean over starts with a bootstrap 95 % CI (the same
    resampled starts for every candidate): error at each h in HS (starts alive at h), error
    averaged over each start's alive steps, and the action gap averaged over all steps."""
    from analysis.rollout_error import bootstrap_masked_mean
    n, horizon = mask.shape
    steps_alive = mask.sum(1)
    res = {}
    for name, v in values.items():
        d_err = v["err"] - values[ref]["err"]
        mean_err = (np.where(mask, v["err"], 0).sum(1) / steps_alive)[:, None]
        mean_ref = (np.where(mask, values[ref]["err"], 0).sum(1) / steps_alive)[:, None]
        cols = {f"h{h}": (d_err[:, h - 1:h], mask[:, h - 1:h]) for h in hs}
        cols["err_mean"] = (mean_err - mean_ref, np.ones((n, 1), bool))
        cols["gap_mean"] = ((v["gap"] - values[ref]["gap"]).mean(1, keepdims=True),
                            np.ones((n, 1), bool))
        cols["own_err_mean"] = (mean_err, np.ones((n, 1), bool))
        cols["own_gap_mean"] = (v["gap"].mean(1, keepdims=True), np.ones((n, 1), bool))
        res[name] = {}
        for key, (x, m) in cols.items():
            point, lo, hi = bootstrap_masked_mean(x, m, reps, np.random.default_rng(seed))
            res[name][key] = (float(point[0]), float(lo[0]), float(hi[0]))
    return res


# ---- report -------------------------------------------------------------------------------

def fmt(x, digits=3):
    return "" if x is None or not np.isfinite(x) else f"{x:.{digits}g}"


def ci(t, digits=3):
    return f"{fmt(t[0], digits)} [{fmt(t[1], digits)}, {fmt(t[2], digits)}]"


def choose(rows: pd.DataFrame, diffs: dict, k1_rule: bool = True) -> str | None:
    """The selection rule of the module docstring (k1_rule: with its third condition)."""
    ok = []
    own = {c: diffs[c]["own_err_mean"][0] for c in diffs}
    for _, r in rows.iterrows():
        if r.candidate in NOT_CANDIDATES:
            continue
        fast = r.speedup_cpu >= 5 and (np.isnan(r.speedup_paper) or r.speedup_paper >= 5)
        d = diffs[r.candidate]
        not_worse = all(d[k][1] <= 0 for k in d if not k.startswith("own_"))
        k2_like = (not k1_rule or "authors-k1" not in own or abs(own[r.candidate] - own["authors"])
                   < abs(own[r.candidate] - own["authors-k1"]))
        if fast and not_worse and k2_like:
            ok.append((r.tps_paper if np.isfinite(r.tps_paper) else r.tps_cpu, r.candidate))
    return max(ok)[1] if ok else None


def to_markdown(res: dict) -> str:
    rows = pd.DataFrame(res["rows"])
    m = res["meta"]
    hs = m["hs"]
    lines = [f"# DyDiff sampler study ({m['task']}, generated locally; 1 CPU thread)", "",
             f"Generator: DyDiffConfig defaults (ensemble start, K = {m['K']} injections, state "
             f"averaging, clipping). NFE = network evaluations per generated trajectory "
             f"(one window of horizon - 1 transitions). Transitions/s: `DyDiffGenerator."
             f"generate` (before the filter) per second of the process's CPU time (one "
             f"thread), fastest of the timed calls; CPU model = the "
             f"trained measure_dydiff model ({m['cpu_model']}), {m['speed_starts']} "
             f"trajectories; smoke / paper = untrained networks of those shapes, "
             f"{m['speed_starts']} / {m['paper_starts']} trajectories.", "",
             "| candidate | K | solver | steps | S_churn | warm start | NFE | tr/s CPU model | "
             "x | tr/s smoke | x | tr/s paper | x |", "|---" * 13 + "|"]
    for _, r in rows.iterrows():
        warm = (f"sigma {r.warm_sigma:g}{', first too' if r.warm_first else ''}"
                if r.warm_start else "-")
        sampler = (f"{r.solver} | {r.num_steps} | {r.S_churn:g} | {warm}" if r.K else
                   "- | - | - | -")
        lines.append(f"| {r.candidate} | {r.K} | {sampler} | "
                     f"{r.nfe} | {fmt(r.tps_cpu)} | {fmt(r.speedup_cpu, 2)} | "
                     f"{fmt(r.tps_smoke)} | {fmt(r.speedup_smoke, 2)} | {fmt(r.tps_paper)} | "
                     f"{fmt(r.speedup_paper, 2)} |")
    lines += ["", f"Accuracy on the trained CPU model: normalised state MSE vs the simulator with "
              f"the policy's actions, {m['n_starts']} starts (n alive at h in brackets), mean "
              f"[95 % bootstrap CI over starts]; Δ = candidate - authors per start (paired, "
              f"same starts), mean [95 % CI]. Mean over steps: each start's error averaged over "
              f"its alive steps 1..{m['error_horizon']}. Gap: action gap ||a_t - pi(s_t)|| "
              f"averaged over all steps.", "",
              "| candidate | " + " | ".join(f"h={h} (n={m['n_alive'][str(h)]})" for h in hs)
              + " | " + " | ".join(f"Δ h={h}" for h in hs)
              + " | mean over steps | Δ mean | gap | Δ gap |", "|---" * (5 + 2 * len(hs)) + "|"]
    for _, r in rows.iterrows():
        d = res["paired"][r.candidate]
        cur = {h: (r[f"err_h{h}"], r[f"err_h{h}_lo"], r[f"err_h{h}_hi"]) for h in hs}
        lines.append(f"| {r.candidate} | " + " | ".join(ci(cur[h]) for h in hs) + " | "
                     + " | ".join(ci(d[f'h{h}']) for h in hs) + f" | {ci(d['own_err_mean'])} | "
                     f"{ci(d['err_mean'])} | {ci(d['own_gap_mean'])} | {ci(d['gap_mean'])} |")
    lines += ["", f"Fastest K = {m['K']} candidate with >= 5x the authors' transitions/s at the "
              f"CPU and paper sizes and no Δ CI entirely above 0: {res['fastest_not_worse']}. "
              f"Of those, the fastest whose mean error over steps is closer to the authors' than "
              f"to the K = 1 reference (it has not, in effect, dropped an injection): "
              f"**{res['chosen']}**. The `fast` preset (dydiff/sampler.py SAMPLER_PRESETS) "
              f"{'is' if res['fast_preset_is_chosen'] else 'is NOT'} this candidate.", ""]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # the study's unit: one thread
    names = args.candidates.split(",")
    unknown = sorted(set(names) - set(CANDIDATES))
    if unknown or "authors" not in names:
        raise SystemExit(f"--candidates: unknown {unknown} or 'authors' missing; known: "
                         f"{list(CANDIDATES)}")
    from analysis.rollout_error import DyDiffModel, rollout_error_study
    from harness.checkpoint import atomic_write_text, load_checkpoint
    from harness.training.policy import load_agent
    ds, dirs, policy = ensure_models(args.models, args.seed)
    agent = load_agent(policy)
    start_all = torch.as_tensor(ds.observations[np.random.default_rng(args.seed).choice(
        len(ds), args.speed_starts, replace=False)])

    rows, models = [], {}
    for name in names:
        t0 = time.perf_counter()
        gen = generator(ds, dirs, name, {"rollout_batch_size": args.speed_starts})
        sc = gen.dynamics.sampler
        row = {"candidate": name, "K": gen.cfg.iterative_times, "solver": sc.solver,
               "num_steps": sc.num_steps,
               "S_churn": sc.S_churn, "warm_start": sc.warm_start, "warm_sigma": sc.warm_sigma,
               "warm_first": sc.warm_first}
        cpu = time_generation(gen, agent, start_all, args.speed_repeats, args.seed)
        row.update(nfe=cpu["nfe_per_trajectory"], tps_cpu=cpu["transitions_per_s"],
                   wall_tps_cpu=cpu["transitions"] / cpu["wall_seconds"])
        smoke = time_generation(untrained_generator(ds, dirs, "smoke", name, args.speed_starts),
                                agent, start_all, args.speed_repeats, args.seed)
        row.update(tps_smoke=smoke["transitions_per_s"],
                   wall_tps_smoke=smoke["transitions"] / smoke["wall_seconds"])
        row["tps_paper"] = row["wall_tps_paper"] = float("nan")
        if not args.skip_paper and name not in ("authors-reseed", "ensemble-k0"):
            paper = time_generation(
                untrained_generator(ds, dirs, "paper", name, args.paper_starts), agent,
                start_all[:args.paper_starts], 1, args.seed)
            row.update(tps_paper=paper["transitions_per_s"],
                       wall_tps_paper=paper["transitions"] / paper["wall_seconds"])
        models[name] = Seeded(DyDiffModel(gen), args.seed + RESEED.get(name, 0))
        rows.append(row)
        log.info("%s: NFE %d, %.1f / %.1f / %.1f transitions/s (%.0f s)", name, row["nfe"],
                 row["tps_cpu"], row["tps_smoke"], row["tps_paper"], time.perf_counter() - t0)

    t0 = time.perf_counter()
    df = rollout_error_study(ds, models, agent, horizon=args.error_horizon,
                             n_starts=args.n_starts, seed=args.seed, reps=args.reps,
                             progress=False)
    log.info("error study: %.0f s", time.perf_counter() - t0)
    pol = df[df["mode"] == "policy"].set_index(["model", "horizon"])
    values, mask = per_start(ds, agent, models, args)
    hs = [h for h in HS if h <= args.error_horizon]
    diffs = paired(values, mask, "authors", args.reps, args.seed, hs)
    base = next(r for r in rows if r["candidate"] == "authors")
    for row in rows:
        for size in ("cpu", "smoke", "paper"):
            row[f"speedup_{size}"] = row[f"tps_{size}"] / base[f"tps_{size}"]
        for h in hs:
            r = pol.loc[(row["candidate"], h)]
            row.update({f"err_h{h}": r.state_mse, f"err_h{h}_lo": r.state_mse_lo,
                        f"err_h{h}_hi": r.state_mse_hi, f"n_h{h}": int(r.n_valid),
                        f"gap_h{h}": r.action_gap})
        row["rollout_seconds"] = models[row["candidate"]].seconds
        for key, (p, lo, hi) in diffs[row["candidate"]].items():
            row.update({f"paired_{key}": p, f"paired_{key}_lo": lo, f"paired_{key}_hi": hi})
    table = pd.DataFrame(rows)
    diff = json.loads(json.dumps(diffs))
    res = {"meta": {"task": ds.name, "K": generator(ds, dirs, "authors").cfg.iterative_times,
                    "n_starts": args.n_starts, "error_horizon": args.error_horizon,
                    "speed_starts": args.speed_starts, "paper_starts": args.paper_starts,
                    "seed": args.seed, "threads": torch.get_num_threads(),
                    "cpu_model": "horizon {horizon}, dim {dim} x {dim_mults}".format(
                        **load_checkpoint(dirs["diffusion"] / "model.pt")["config"]),
                    "hs": hs, "n_alive": {str(h): int(mask[:, h - 1].sum()) for h in hs}},
           "candidates": {n: CANDIDATES[n] for n in names}, "rows": rows, "paired": diff}
    res["fastest_not_worse"] = choose(table, diffs, k1_rule=False)
    res["chosen"] = choose(table, diffs)
    from dydiff.sampler import sampler_config
    res["fast_preset_is_chosen"] = (res["chosen"] is not None and sampler_config("fast")
                                    == sampler_of(res["chosen"]))
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "sampler_study.csv", index=False)
    atomic_write_text(args.out / "sampler_study.json", json.dumps(res, indent=2, default=float))
    md = to_markdown(res)
    atomic_write_text(args.out / "sampler_study.md", md)
    print(md)


if __name__ == "__main__":
    main()
