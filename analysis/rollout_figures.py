"""Figures of the rollout-error study: error and action gap vs horizon per model
(`plot_rollout_error`), and every policy-mode model at the horizon's end side by side, the
injection counts K in order (`plot_at_horizon`)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import plotting

INJECTED = re.compile(r"^diffusion K=(\d+)$")  # the study's rows of the diffusion model, K injections


def injection_count(model: str) -> int | None:
    """K of a "diffusion K=<k>" row, else None."""
    m = INJECTED.match(model)
    return int(m.group(1)) if m else None


def plot_rollout_error(df: pd.DataFrame, out_dir: Path, task: str = "") -> list[Path]:
    """State error (log scale), where available return error, and the action gap (policy mode)
    vs horizon; one column per mode, CI bands per model. Saves rollout_error.png/.pdf in
    out_dir."""
    modes = [m for m in ("behaviour", "policy") if m in set(df["mode"])]
    has_ret = df.return_err.notna().any()
    has_gap = "action_gap" in df and df.action_gap.notna().any()
    panels = ["state_mse"] + (["return_err"] if has_ret else []) + (
        ["action_gap"] if has_gap else [])
    nrows = len(panels)
    fig, axes = plotting.new_figure(5.0 * len(modes), 3.6 * nrows, ncols=len(modes), nrows=nrows)
    axes = np.array(axes, dtype=object).reshape(nrows, len(modes))
    titles = {"behaviour": "dataset actions (open loop)", "policy": "policy actions"}
    ylabels = {"state_mse": "normalised state MSE (obs std units²)",
               "return_err": "|predicted - true return| (reward units)",
               "action_gap": "mean ||a_t - pi(s_t)|| (action units)"}
    empty = {"return_err": "no predicted rewards\n(no reward model given)",
             "action_gap": "no action gap: the dataset's actions\nare not the policy's"}
    policy_only = sorted(set(df.model[df["mode"] == "policy"])
                         - set(df.model[df["mode"] == "behaviour"]))
    order = list(dict.fromkeys(df.model))  # one colour per model in every panel
    for j, mode in enumerate(modes):
        sub = df[df["mode"] == mode]
        for name, g in sub.groupby("model", sort=False):
            c = plotting.color(name, order.index(name))
            for r, col in enumerate(panels):
                if g[col].notna().any():
                    axes[r, j].plot(g.horizon, g[col], color=c, label=name)
                    axes[r, j].fill_between(g.horizon, g[f"{col}_lo"], g[f"{col}_hi"], color=c,
                                            alpha=0.2)
        ax = axes[0, j]
        if (sub.state_mse > 0).any():
            ax.set_yscale("log")
        ax.set_title(f"{task} state error, {titles[mode]}".strip())
        if mode == "behaviour" and policy_only:
            ax.text(0.02, 0.02, f"{', '.join(policy_only)}: policy actions only (no open-loop "
                    f"mode)", transform=ax.transAxes, fontsize="small", color="grey")
        for r, col in enumerate(panels):
            ax = axes[r, j]
            if r:
                ax.set_title({"return_err": "return error", "action_gap": "action gap"}[col]
                             + f", {titles[mode]}")
            ax.set_xlabel("rollout horizon h (steps)")
            ax.set_ylabel(ylabels[col])
            if ax.has_data():
                ax.legend(frameon=False)
            else:
                ax.text(0.5, 0.5, empty[col], ha="center", va="center", transform=ax.transAxes,
                        color="grey")
                if col == "action_gap":
                    ax.axis("off")  # not a missing input: the gap is undefined in this mode
    return plotting.save_figure(fig, Path(out_dir) / "rollout_error")


def plot_at_horizon(df: pd.DataFrame, out_dir: Path, task: str = "") -> list[Path]:
    """Policy mode at h = H: state error, return error and action gap of every model with its
    95 % CI, the "diffusion K=<k>" rows in order of K and joined by a line (the injection
    mechanism: K = 0 is the model's own behaviour actions), the other models beside them.
    Saves rollout_error_at_H.png/.pdf in out_dir."""
    pol = df[df["mode"] == "policy"]
    H = int(df.horizon.max())
    panels = [c for c in ("state_mse", "return_err", "action_gap")
              if c in pol and pol[c].notna().any()]
    ncols = max(len(panels), 1)
    fig, axes = plotting.new_figure(4.2 * ncols, 3.8, ncols=ncols)
    axes = np.array(axes, dtype=object).reshape(1, ncols)
    if pol.empty:
        ax = axes[0, 0]
        ax.text(0.5, 0.5, "no policy-mode rows\n(the study ran without a policy)",
                ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_xlabel("model")
        ax.set_ylabel("value at the horizon's end")
        ax.set_title(f"{task} at h = {H}".strip())
        return plotting.save_figure(fig, Path(out_dir) / "rollout_error_at_H")
    last = pol[pol.horizon == H].set_index("model")
    order = list(dict.fromkeys(pol.model))
    injected = sorted((m for m in order if injection_count(m) is not None), key=injection_count)
    others = [m for m in order if injection_count(m) is None]
    names = injected + others
    x = np.arange(len(names))
    labels = {"state_mse": "normalised state MSE (obs std units²)",
              "return_err": "|predicted - true return| (reward units)",
              "action_gap": "||a_t - pi(s_t)|| (action units)"}
    titles = {"state_mse": "state error", "return_err": "return error",
              "action_gap": "action gap"}
    for ax, col in zip(axes[0], panels):
        y = last.loc[names, col].to_numpy(float)
        lo = last.loc[names, f"{col}_lo"].to_numpy(float)
        hi = last.loc[names, f"{col}_hi"].to_numpy(float)
        for i, name in enumerate(names):
            c = plotting.color("diffusion" if i < len(injected) else name, order.index(name))
            ax.errorbar(x[i], y[i], yerr=[[y[i] - lo[i]], [hi[i] - y[i]]], fmt="o", color=c,
                        capsize=3)
        if injected:
            ax.plot(x[:len(injected)], y[:len(injected)], color="grey", lw=1, zorder=0,
                    label="diffusion model, K injections")
            ax.legend(frameon=False, fontsize="small")
        if col == "state_mse" and (y > 0).all():
            ax.set_yscale("log")
        ax.set_xticks(x, [n.replace("diffusion ", "") for n in names], rotation=30,
                      ha="right")
        ax.set_xlabel("model (K = policy injections of the diffusion model)")
        ax.set_ylabel(labels[col])
        ax.set_title(f"{task} {titles[col]} at h = {H}".strip())
    return plotting.save_figure(fig, Path(out_dir) / "rollout_error_at_H")
