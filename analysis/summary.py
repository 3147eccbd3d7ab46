"""summary.md: what the numbers show, in words, generated from the analysis outputs.

Every sentence is built from the data handed in (aggregates, tables, rollout-error curves); no
number is typed in here. Caveats (seed counts, bootstrap reps, budget, dataset provenance) are
stated next to the claims they qualify.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.aggregate import environment_notes, physics_note
from analysis.datasets import not_published, section as data_section, warnings as data_warnings
from analysis.plotting import label
from analysis.tables import NA, NOT_RUN
from harness.checkpoint import atomic_write_text

FEW_SEEDS = 5  # below this, rliable's paper calls CIs unreliable and we say so


def _ci(row) -> str:
    return f"{row.estimate:.1f} [{row.ci_low:.1f}, {row.ci_high:.1f}]"


def _aggregate_section(res: dict) -> list[str]:
    agg: pd.DataFrame = res["aggregates"]
    poi: pd.DataFrame = res["improvement"]
    iqm = agg[agg.metric == "IQM"].set_index("method")
    lines = ["## Aggregate performance (rliable)", ""]
    n_tasks = int(iqm.n_tasks.iloc[0])
    runs = iqm.n_runs
    lines.append(f"Scores are D4RL normalised (0-100) over {n_tasks} task(s) shared by all "
                 f"methods, {runs.min()}{'' if runs.min() == runs.max() else f'-{runs.max()}'} "
                 f"run(s) per task; intervals are 95 % stratified-bootstrap CIs with "
                 f"{res['reps']} resamples.")
    lines.append("")
    ranked = iqm.sort_values("estimate", ascending=False)
    lines.append("IQM ranking: " + "; ".join(f"{label(m)} {_ci(r)}"
                                             for m, r in ranked.iterrows()) + ".")
    if len(ranked) > 1 and runs.min() < 2:
        lines.append(f"With a single run per task the CIs are points: the order of "
                     f"{label(ranked.index[0])} and {label(ranked.index[1])} is not resolved "
                     f"by these runs.")
    elif len(ranked) > 1:
        top, second = ranked.iloc[0], ranked.iloc[1]
        # A collapsed interval (all runs equal) resolves nothing either.
        overlap = top.ci_low <= second.ci_high or top.ci_low == top.ci_high
        lines.append(f"The highest IQM is {label(ranked.index[0])}'s; its CI "
                     + ("overlaps" if overlap else "does not overlap")
                     + f" that of the runner-up ({label(ranked.index[1])}), so the ranking of "
                     + ("these two is not resolved by these runs." if overlap
                        else "these two is clear at this confidence level."))
    lines.append("")
    for r in poi.itertuples():
        x, y = iqm.loc[r.x], iqm.loc[r.y]
        lines.append(f"- {label(r.x)}'s IQM is {_ci(x)} vs {label(r.y)}'s {_ci(y)}; "
                     f"P({label(r.x)} > {label(r.y)}) = {r.probability:.2f} "
                     f"[{r.ci_low:.2f}, {r.ci_high:.2f}] over {r.n_tasks} task(s) — "
                     f"{_verdict(r, min(x.n_runs, y.n_runs))}.")
    for note in res.get("notes", []):
        lines.append(f"- Note: {note}.")
    lines.append("")
    return lines


def _verdict(r, runs: int) -> str:
    """What a P(X > Y) interval supports. With fewer than 2 runs per task (or an interval
    collapsed to a point) the bootstrap has nothing to resample, so no difference is claimed."""
    if runs < 2 or r.ci_low == r.ci_high:
        return (f"{'a single run' if runs < 2 else 'a collapsed interval'} per task: the "
                f"bootstrap cannot measure uncertainty, so these runs support no claim of a "
                f"difference")
    if r.ci_low > 0.5:
        return "the CI excludes 0.5, so the improvement is statistically distinguishable"
    if r.ci_high < 0.5:
        return "the CI excludes 0.5 on the low side: the base algorithm is better"
    return "the CI contains 0.5: no evidence of a difference with these runs"


def _cell_mean(cell: str) -> float | None:
    if cell in (NA, NOT_RUN):
        return None
    return float(cell.split("±")[0])


def _tables_section(tables: dict, datasets: dict | None = None) -> list[str]:
    lines = ["## Per-task comparison and published numbers", ""]
    for name, t in tables.items():
        if name == "overall":
            continue
        table = t["table"]
        cols = table["columns"]
        own = [i for i, c in enumerate(cols) if c.endswith("(ours)")]
        if len(own) == 2:
            a, b = (cols[i].removesuffix(" (ours)") for i in own)
            wins = sum(1 for _, cells in table["rows"]
                       if None not in (_cell_mean(cells[own[0]]), _cell_mean(cells[own[1]]))
                       and _cell_mean(cells[own[1]]) > _cell_mean(cells[own[0]]))
            both = sum(1 for _, cells in table["rows"]
                       if None not in (_cell_mean(cells[own[0]]), _cell_mean(cells[own[1]])))
            lines.append(f"- {t['title']}: {b} has the higher mean on {wins} of {both} task(s) "
                         f"run by both.")
        for j, c in enumerate(cols):
            if c.endswith("(ours)"):
                continue
            method = c.split(" (")[0]
            mine = next((i for i in own if cols[i].split(" (")[0] == method), None)
            pairs = [(_cell_mean(cells[mine]), _cell_mean(cells[j]))
                     for _, cells in table["rows"] if mine is not None]
            pairs = [(o, p) for o, p in pairs if o is not None and p is not None]
            if not pairs:
                if all(cells[j] == NA for _, cells in table["rows"]):
                    lines.append(f"  - {c}: no published number for these tasks ({NA}).")
                continue
            diff = np.mean([o - p for o, p in pairs])
            tasks = [task for task, cells in table["rows"] if mine is not None
                     and None not in (_cell_mean(cells[mine]), _cell_mean(cells[j]))]
            other = not_published(datasets, tasks)
            lines.append(f"  - Our {method} is on average {abs(diff):.1f} points "
                         f"{'above' if diff >= 0 else 'below'} {c} on {len(pairs)} task(s)"
                         + (", on data that is not the published data ("
                            + "; ".join(f"{t}: {o}" for t, o in other.items())
                            + "): not a like-for-like comparison" if other else "") + ".")
    lines += ["", _published_note(datasets), ""]
    return lines


def _published_note(datasets: dict | None) -> str:
    """What the published numbers stand on, against this run's data (analysis.datasets)."""
    base = ("Published numbers were obtained on D4RL's datasets (-v2; maze2d -v1; MOPO's "
            "paper -v0; recorded with mujoco-py) with their authors' budgets")
    if datasets is None:
        return (base + "; if this run used other data or a reduced budget, differences to "
                "them are expected and are not a verdict on the implementation.")
    other = not_published(datasets, list(datasets))
    if not other:
        return (base + "; this run's data are files under D4RL's names (their sha256 in the "
                "Data section), so differences come from the methods, budgets and the MuJoCo "
                "release, not from other data.")
    return (base + ". This run's data is not that data for " + "; ".join(
        f"{t} ({o})" for t, o in other.items()) + ": differences to them on those tasks are "
        "expected and are not a verdict on the implementation.")


MODEL_NOTES = {"diffusion": "the diffusion model alone",
               "dydiff fast": "the DyDiff generator with the `fast` sampler preset",
               "dydiff": "the DyDiff generator as training samples it (ensemble start, "
                         "policy injections, clipping to the data range)"}


def _action_gap_lines(g: pd.DataFrame) -> list[str]:
    """Policy mode: how far each model's trajectory actions are from pi at its own states."""
    if "action_gap" not in g or not g.action_gap.notna().any():
        return []
    H = int(g.horizon.max())
    curves = {m: gm.set_index("horizon") for m, gm in g.groupby("model", sort=False)
              if gm.action_gap.notna().any()}
    lines = ["  Action gap ||a_t - pi(s_t)|| along each model's trajectory (action units), mean "
             f"over h=1..{H}, then at h={H} [95% CI]: " + "; ".join(
                 f"{m} {c.action_gap.mean():.3g}, {c.action_gap.iloc[-1]:.3g} "
                 f"[{c.action_gap_lo.iloc[-1]:.3g}, {c.action_gap_hi.iloc[-1]:.3g}]"
                 for m, c in curves.items()) + "."]
    exact = [m for m, c in curves.items() if (c.action_gap == 0).all()]
    if exact:
        lines.append(f"  Gap 0 at every step for {', '.join(exact)}: they step with the "
                     f"policy's own actions.")
    if "diffusion" in curves and "dydiff" in curves:
        d, y = curves["diffusion"], curves["dydiff"]
        below = int((y.action_gap_hi < d.action_gap_lo).sum())
        above = int((y.action_gap_lo > d.action_gap_hi).sum())
        lines.append(f"  dydiff vs the diffusion model alone: mean gap {y.action_gap.mean():.3g} "
                     f"vs {d.action_gap.mean():.3g}; their CIs are apart at {below} of {H} steps "
                     f"with dydiff lower and at {above} with dydiff higher.")
    return lines


def _injection_lines(g: pd.DataFrame) -> list[str]:
    """Policy mode, the "diffusion K=<k>" rows: state error, return error and action gap at
    h = H against K, and whether K = 0 and the largest K are apart (CIs disjoint)."""
    from analysis.rollout_figures import injection_count
    H = int(g.horizon.max())
    last = g[g.horizon == H].set_index("model")
    ks = sorted((injection_count(m), m) for m in last.index if injection_count(m) is not None)
    if not ks:
        return []
    lines = [f"  Policy injections (the diffusion model from its own action-free sample, then K "
             f"injections of pi's actions; K = 0 steps with its own behaviour actions), at "
             f"h={H} [95% CI]:"]
    for col, what in (("state_mse", "state error"), ("return_err", "return error"),
                      ("action_gap", "action gap")):
        if not last[col].notna().any():
            continue
        parts = [f"K={k} {last.at[m, col]:.3g} [{last.at[m, f'{col}_lo']:.3g}, "
                 f"{last.at[m, f'{col}_hi']:.3g}]" for k, m in ks]
        (k0, m0), (kn, mn) = ks[0], ks[-1]
        apart = (last.at[mn, f"{col}_hi"] < last.at[m0, f"{col}_lo"]
                 or last.at[mn, f"{col}_lo"] > last.at[m0, f"{col}_hi"])
        verdict = (f"K={kn} vs K={k0}: CIs apart ({'lower' if last.at[mn, col] < last.at[m0, col] else 'higher'})"
                   if apart else f"K={kn} vs K={k0}: CIs overlap, no difference shown")
        lines.append(f"  - {what}: " + "; ".join(parts) + f". {verdict}.")
    if "n_seeds" in g and g.n_seeds.notna().any():
        lines.append(f"  Pooled over {int(g.n_seeds.max())} model seeds (each with its own "
                     f"learning policy); CIs resample seeds, then starts.")
    return lines


def _rollout_section(results) -> list[str]:
    if isinstance(results, pd.DataFrame) and "task" in results:
        results = [{"task": task, "rollout_error": g}
                   for task, g in results.groupby("task", sort=False)]
    if isinstance(results, (dict, pd.DataFrame)):
        results = [results]
    lines = ["## Rollout error vs the MuJoCo simulator", ""]
    for res in results:
        df = res["rollout_error"] if isinstance(res, dict) else res
        task = res.get("task", "") if isinstance(res, dict) else ""
        H = int(df.horizon.max())
        for mode, g in df.groupby("mode", sort=False):
            at = {}
            for model, gm in g.groupby("model", sort=False):
                alive = gm[gm.n_valid > 0]
                last = alive.iloc[-1] if len(alive) else gm.iloc[-1]
                at[model] = (gm.iloc[0], last)
            what = "dataset actions, open loop" if mode == "behaviour" else "policy actions"
            parts = [f"{m} {first.state_mse:.3g} at h=1 -> {last.state_mse:.3g} "
                     f"[{last.state_mse_lo:.3g}, {last.state_mse_hi:.3g}] at "
                     f"h={int(last.horizon)} (n={int(last.n_valid)} starts)"
                     for m, (first, last) in at.items()]
            lines.append(f"- {task} ({what}), normalised state MSE: " + "; ".join(parts) + ".")
            if "dydiff" in at:
                lines.append("  Models: " + "; ".join(
                    f"{m} = {MODEL_NOTES[m]}" for m in at if m in MODEL_NOTES) + ".")
            if len(at) > 1:
                best = min(at, key=lambda m: at[m][1].state_mse)
                lines.append(f"  Lowest long-horizon error: {best}.")
            rets = {m: last.return_err for m, (_, last) in at.items()
                    if np.isfinite(last.return_err)}
            if rets:
                lines.append("  Return error over the horizon: " + "; ".join(
                    f"{m} {v:.3g}" for m, v in rets.items()) + " (reward units).")
            if mode == "behaviour":
                policy_only = [m for m in df.model[df["mode"] == "policy"].unique() if m not in at]
                if policy_only:
                    lines.append(f"  {', '.join(policy_only)}: policy actions only (no "
                                 f"open-loop mode), not in this comparison.")
            else:
                lines += _action_gap_lines(g)
                lines += _injection_lines(g)
                open_only = [m for m in df.model[df["mode"] == "behaviour"].unique()
                             if m not in at]
                if open_only:
                    lines.append(f"  {', '.join(open_only)}: dataset actions only, not in this "
                                 f"panel (the diffusion model's policy rows are its K rows, "
                                 f"or it was trained always action-conditioned and cannot "
                                 f"sample its own actions).")
        if (df.n_valid < df.groupby(["mode", "model"]).n_valid.transform("max")).any():
            lines.append(f"  Some simulated episodes terminate before h={H}; later steps are "
                         f"masked, so long-horizon averages use fewer starts.")
    lines.append("")
    return lines


def models_sentence(shared: bool, models: list[str] | None = None) -> str:
    """Which models the runs used (`models`: the kinds the grid's methods train; None: not
    known, the usual three named): shared models leave model variance out of every CI."""
    if models is not None and not models:
        return "Models: none; every method of this grid is model-free."
    kinds = " / ".join(models) if models else "ensemble / reward / diffusion"
    return (f"Models: one {kinds} model per task, shared by every seed "
            "(models.shared_across_seeds): the intervals leave out model-training variance."
            if shared else
            f"Models: each seed trained its own {kinds} model(s) (seeded with the run seed), "
            "so the intervals include model-training variance.")


def write_summary(aggregates: dict | None, tables: dict | None, rollout_error, out_path: Path,
                  budget: str | None = None, models_shared: bool | None = None,
                  models: list[str] | None = None, datasets: dict | None = None) -> str:
    """Write the summary markdown to `out_path` and return it. Any input may be None (that
    section is then omitted and the omission stated). `budget` names the config (e.g.
    'smoke') for the caveats; `models_shared` says whether the seeds shared their models,
    `models` which model kinds the grid's methods train; `datasets` {task: dataset record}
    (analysis.datasets: the Data section and its warnings)."""
    lines = ["# dydiff-bench summary", ""]
    caveats = []
    if budget:
        caveats.append(f"Budget: '{budget}' config." + (
            " Smoke runs train for minutes on CPU; their scores test the pipeline, not the "
            "methods, and must not be compared with published numbers." if budget == "smoke"
            else ""))
    if models_shared is not None:
        caveats.append(models_sentence(models_shared, models))
    if aggregates is not None:
        runs = aggregates["aggregates"].n_runs
        if runs.min() < FEW_SEEDS:
            caveats.append(f"Only {runs.min()} run(s) per task for some methods (fewer than "
                           f"{FEW_SEEDS}): bootstrap CIs are wide and themselves uncertain; "
                           f"with one run per task they collapse to a point and mean nothing.")
        if aggregates["reps"] < 50_000:
            caveats.append(f"{aggregates['reps']} bootstrap resamples (rliable's paper uses "
                           f"50,000): CI end-points carry Monte-Carlo noise.")
    if aggregates is not None and "scores" in aggregates:
        physics = physics_note(aggregates["scores"])
        if physics:
            caveats.append(physics)
    if caveats:
        lines += ["**Caveats.** " + " ".join(caveats), ""]
    env_notes = (aggregates.get("environment_notes") if aggregates is not None else None)
    if env_notes is None and aggregates is not None and "scores" in aggregates:
        env_notes = environment_notes(aggregates["scores"])
    for note in env_notes or []:
        lines += [f"**Warning: different environments.** {note[0].upper()}{note[1:]}.", ""]
    for warning in data_warnings(datasets):
        lines += [warning, ""]
    lines += data_section(datasets)
    if aggregates is not None:
        lines += _aggregate_section(aggregates)
    else:
        lines += ["(No aggregate statistics were computed.)", ""]
    if tables is not None:
        lines += _tables_section(tables, datasets)
    if rollout_error is not None:
        lines += _rollout_section(rollout_error)
    else:
        lines += ["(No rollout-error study was run.)", ""]
    text = "\n".join(lines).rstrip() + "\n"
    atomic_write_text(out_path, text)
    return text
