"""Job step: rliable aggregates, paper tables and the summary, from the evaluation files (the
DAG) or from the runs of an MLflow store or server (`dydiff-bench analyze --from-mlflow`)."""
from __future__ import annotations

import html
import logging
import tempfile
from pathlib import Path

import pandas as pd

from analysis.aggregate import ScoreError, run_aggregate, scores_from_mlflow, trial_runs
from analysis.datasets import load_records
from analysis.summary import write_summary
from analysis.tables import _task_key, run_tables
from harness import plan, tracking
from harness.checkpoint import atomic_write_text

log = logging.getLogger("dydiff.analysis")


def rollout_error_from_mlflow(uri: str, experiments: list[str], filter_string: str = "",
                              tasks: list[str] | None = None) -> pd.DataFrame | None:
    """The rollout-error study's table of every task, from the `rollout_error.csv` artefact of
    its runs; tasks in the order of `tasks` (a config's), else in the tables' order."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    name = Path(plan.PATHS["rollout_error_csv"]).name
    frames: dict[str, pd.DataFrame] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in trial_runs(uri, experiments, "rollout-error", filter_string):
            task = run.data.tags.get("task", "")
            if name not in {a.path for a in tracking.retry(client.list_artifacts,
                                                            run.info.run_id)}:
                log.warning("rollout-error run %s (%s) has no %s, left out", run.info.run_id,
                            run.info.run_name, name)
                continue
            if task in frames:
                raise ScoreError(f"MLflow store {uri}: several rollout-error runs of task "
                                 f"{task!r} (pick one with --filter)")
            local = tracking.retry(client.download_artifacts, run.info.run_id, name,
                                   str(Path(tmp) / run.info.run_id))
            frames[task] = pd.read_csv(local).assign(task=task)
    if not frames:
        return None
    order = [t for t in tasks if t in frames] if tasks else sorted(frames, key=_task_key)
    return pd.concat([frames[t] for t in order])


def markdown_html(text: str, title: str) -> str:
    """A standalone HTML page of the Markdown the analysis writes (Python-Markdown with pipe
    tables; our lists indent by 2): Snakemake's report shows HTML results inline but offers
    Markdown files only as downloads."""
    import markdown
    body = markdown.markdown(text, extensions=["tables"], tab_length=2)
    style = ("body{font-family:sans-serif;font-size:14px;margin:1em}table{border-collapse:"
             "collapse;margin:.5em 0 1.5em}th,td{border:1px solid #bbb;padding:2px 8px;"
             "text-align:center}td:first-child{text-align:left}")
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body>\n{body}\n</body></html>\n")


def analyze_step(spec: dict, log_fn=None) -> dict:
    """spec["scores"] / spec["rollout_error"]: the DAG's files; or spec["mlflow"] = {"uri",
    "experiments", "filter"}: the same inputs read from an MLflow store or server.
    spec["datasets"]: {task: dataset file}, whose records (verdict, origin) the summary and
    the tables' captions report."""
    out, cfg = Path(spec["out"]), spec["config"]
    rule = cfg.get("score_rule", "final")
    source = spec.get("mlflow")
    if source:
        scores = scores_from_mlflow(source["uri"], source["experiments"],
                                    source.get("filter", ""), rule)
        rerr = rollout_error_from_mlflow(source["uri"], source["experiments"],
                                         source.get("filter", ""), spec.get("tasks"))
    else:
        scores = [Path(p) for p in spec["scores"]]
        rerr = (pd.concat([pd.read_csv(p).assign(task=Path(p).parent.name)
                           for p in spec["rollout_error"]]) if spec["rollout_error"] else None)
    datasets = load_records(spec.get("datasets"))  # each task's data and its verdict
    aggregates = run_aggregate(scores, out, reps=cfg["reps"], seed=cfg["seed"], rule=rule)
    tables = run_tables(scores, out / "tables", rule=rule, models_shared=cfg.get("models_shared"),
                        datasets=datasets)
    summary = write_summary(aggregates, tables, rerr, out / "summary.md", budget=cfg["name"],
                            models_shared=cfg.get("models_shared"), models=cfg.get("models"),
                            datasets=datasets)
    # HTML twins of the Markdown for Snakemake's report (it renders HTML, not Markdown).
    atomic_write_text(out / "tables" / "tables.html", markdown_html(
        (out / "tables" / "tables.md").read_text(), "Paper tables"))
    atomic_write_text(out / "summary.html", markdown_html(summary, "Summary"))
    return {f"{r['method']}/{r['metric']}": float(r["estimate"])
            for _, r in aggregates["aggregates"].iterrows()}
