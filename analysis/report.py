"""Job step: rliable aggregates, paper tables and the summary from the evaluation files."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.aggregate import run_aggregate
from analysis.summary import write_summary
from analysis.tables import run_tables


def analyze_step(spec: dict, log_fn=None) -> dict:
    out, cfg = Path(spec["out"]), spec["config"]
    scores = [Path(p) for p in spec["scores"]]
    aggregates = run_aggregate(scores, out, reps=cfg["reps"], seed=cfg["seed"])
    tables = run_tables(scores, out / "tables")
    rerr = (pd.concat([pd.read_csv(p).assign(task=Path(p).parent.name)
                       for p in spec["rollout_error"]]) if spec["rollout_error"] else None)
    write_summary(aggregates, tables, rerr, out / "summary.md", budget=cfg["name"])
    return {f"{r['method']}/{r['metric']}": float(r["estimate"])
            for _, r in aggregates["aggregates"].iterrows()}
