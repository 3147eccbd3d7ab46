"""Paper tables: the harness's own runs next to published numbers, Markdown + LaTeX (booktabs).

One table per base algorithm (TD3+BC family: TD3+BC, DyDiff-TD3BC; CQL family) plus an overall
table of every method run. Cells are mean ± std over seeds (sample std, ddof = 1; a single
seed prints the bare score) of the D4RL normalised score; the last row is each own method's
IQM over all runs x tasks (rliable's 25 % trimmed mean) and, for published columns, the mean
over tasks when every row has a published number. Published numbers come only from
`published.yaml` (each with its source); an unknown one prints "n/a", a method not run prints
"–". The best own-run mean per row is bold.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from rliable import metrics

from analysis.aggregate import SCORE_RULES, collect_scores, ordered, physics_note
from analysis.datasets import caption as data_caption, not_published
from analysis.plotting import label
from harness import registry
from harness.checkpoint import atomic_write_text
from harness.envs import FAMILIES, dataset_kinds

DEFAULT_PUBLISHED = Path(__file__).with_name("published.yaml")
NA, NOT_RUN = "n/a", "–"


class PublishedError(ValueError):
    """published.yaml is malformed; the message names the key."""


@dataclass(frozen=True)
class Published:
    key: str                 # source id in published.yaml
    label: str               # short column label
    source: str              # full citation
    seeds: int | None
    scores: dict             # {method: {task: (mean, std)}}
    score_rule: str = "not stated"  # which evaluation(s) a score is (e.g. "last eval")


def load_published(path: Path | None = None) -> list[Published]:
    """Read and validate published.yaml (default: the one shipped next to this module)."""
    path = DEFAULT_PUBLISHED if path is None else Path(path)
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise PublishedError(f"published scores file {path} does not exist") from None
    if not isinstance(data, dict):
        raise PublishedError(f"{path}: expected a mapping of source ids")
    out = []
    for key, block in data.items():
        where = f"{path}: {key}"
        if not isinstance(block, dict):
            raise PublishedError(f"{where}: expected a mapping")
        for field in ("label", "source", "scores"):
            if field not in block:
                raise PublishedError(f"{where}: missing key '{field}'")
        unknown = set(block) - {"label", "source", "seeds", "dataset_version", "score_rule",
                                "scores"}
        if unknown:
            raise PublishedError(f"{where}: unknown key(s) {sorted(unknown)}")
        scores = {}
        for method, cells in (block["scores"] or {}).items():
            scores[method] = {}
            for task, cell in (cells or {}).items():
                ok = (isinstance(cell, list) and len(cell) == 2
                      and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                              for v in cell))
                if not ok:
                    raise PublishedError(f"{where}.scores.{method}.{task}: expected "
                                         f"[mean, std], got {cell!r}")
                scores[method][task] = (float(cell[0]), float(cell[1]))
        out.append(Published(key, str(block["label"]), " ".join(str(block["source"]).split()),
                             block.get("seeds"), scores,
                             str(block.get("score_rule") or "not stated")))
    return out


# ---- table model --------------------------------------------------------------------------

def _task_key(task: str):
    """Family, then its datasets in the family's order (random ... expert; maze2d: umaze,
    medium, large: harness.envs.dataset_kinds), unknown ones last."""
    family, _, kind = task.partition("-")
    kinds = dataset_kinds(family) if family in FAMILIES else ()
    return (family, kinds.index(kind) if kind in kinds else len(kinds), kind)


def _fmt(mean: float, std: float | None, digits: int = 1) -> str:
    if std is None or math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def build_table(df: pd.DataFrame, methods: list[str], published: list[Published],
                published_methods: list[str] | None = None, rule: str = "final") -> dict:
    """The cells of one table. `published_methods` (default `methods`) picks which published
    columns to add: one per (source, method) for the sources the registry names for the method
    (`Method.published`) that report it; a source without numbers prints n/a. `rule`: the
    score rule of our runs (aggregate.SCORE_RULES), stated per column with the sources'.
    Returns {"columns", "rules", "rows", "bold", "caption_seeds", "sources"}."""
    published_methods = methods if published_methods is None else published_methods
    own = [m for m in methods if m in set(df.method)]
    tasks = sorted(df[df.method.isin(own)].task.unique(), key=_task_key)
    pub_cols = [(p, m) for m in published_methods for p in published
                if m in p.scores and m in registry.METHODS
                and p.key in registry.METHODS[m].published]
    columns = [f"{label(m)} (ours)" for m in own] + [f"{label(m)} ({p.label})"
                                                     for p, m in pub_cols]
    rows, bold = [], []
    for task in tasks:
        cells, means = [], []
        for m in own:
            s = df[(df.method == m) & (df.task == task)].normalized_score.to_numpy()
            if len(s) == 0:
                cells.append(NOT_RUN)
                means.append(-np.inf)
            else:
                cells.append(_fmt(s.mean(), s.std(ddof=1) if len(s) > 1 else None))
                means.append(s.mean())
        best = int(np.argmax(means)) if own and np.isfinite(max(means)) else None
        for p, m in pub_cols:
            cell = p.scores[m].get(task)
            cells.append(NA if cell is None else _fmt(*cell))
        rows.append((task, cells))
        bold.append(best)
    # Summary row: IQM of own runs (all seeds x tasks), mean over tasks of published cells.
    summary = []
    for m in own:
        s = df[(df.method == m) & df.task.isin(tasks)].normalized_score.to_numpy()
        summary.append(f"{metrics.aggregate_iqm(s):.1f}")
    for p, m in pub_cols:
        vals = [p.scores[m].get(t) for t in tasks]
        summary.append(NA if not vals or any(v is None for v in vals)
                       else f"{np.mean([v[0] for v in vals]):.1f}")
    seeds = {}
    for m in own:
        counts = df[df.method == m].groupby("task").seed.nunique()
        seeds[m] = (int(counts.min()), int(counts.max()))
    rules = [SCORE_RULES[rule][1]] * len(own) + [p.score_rule for p, _ in pub_cols]
    return {"columns": columns, "rules": rules, "rows": rows, "bold": bold, "summary": summary,
            "caption_seeds": seeds, "sources": sorted({p.key: p for p, _ in pub_cols}.values(),
                                                      key=lambda p: p.key)}


def _caption(title: str, table: dict) -> str:
    seeds = ", ".join(f"{label(m)} {lo} seed{'s' if hi > 1 else ''}" if lo == hi
                      else f"{label(m)} {lo}-{hi} seeds"
                      for m, (lo, hi) in table["caption_seeds"].items())
    text = (f"{title}: D4RL normalised score, mean ± std over seeds ({seeds}); "
            f"first row: each column's score rule; bold = best own run per task; last row: "
            f"IQM of own runs over all seeds and "
            f"tasks, mean over tasks for published columns.")
    if table.get("models_shared") is not None and table.get("model_based", True):
        text += (" Our model-based runs: one model per task shared by every seed (intervals "
                 "leave out model variance)." if table["models_shared"] else
                 " Our model-based runs: models trained per seed.")
    if table.get("physics"):
        text += " " + table["physics"]
    if table.get("data"):
        text += " " + table["data"]
    if table["sources"]:
        text += " Published: " + "; ".join(
            f"{p.label}: {p.source}" + (f" ({p.seeds} seeds)" if p.seeds else "")
            for p in table["sources"]) + f" (rounded to one decimal). {NA} = not published/unknown."
        if table.get("not_published"):
            text += (" The published numbers were obtained on D4RL's files; this run's data "
                     "is not that data for " + ", ".join(table["not_published"])
                     + ": those comparisons are not like for like.")
    return text


def to_markdown(title: str, table: dict) -> str:
    head = ["task"] + table["columns"]
    lines = [f"**{_caption(title, table)}**", "", "| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] + [":---:"] * len(table["columns"])) + "|",
             "| " + " | ".join(["*score rule*"] + [f"*{r}*" for r in table["rules"]]) + " |"]
    for (task, cells), best in zip(table["rows"], table["bold"]):
        cells = [f"**{c}**" if i == best else c for i, c in enumerate(cells)]
        lines.append("| " + " | ".join([task] + cells) + " |")
    lines.append("| " + " | ".join(["IQM / mean"] + table["summary"]) + " |")
    return "\n".join(lines) + "\n"


def _tex(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"),
                 ("#", r"\#"), ("±", r"$\pm$"), ("–", "--")):
        text = text.replace(a, b)
    return text


def to_latex(title: str, table: dict, tag: str) -> str:
    ncol = len(table["columns"])
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             rf"\caption{{{_tex(_caption(title, table))}}}", rf"\label{{tab:{tag}}}",
             r"\begin{tabular}{l" + "c" * ncol + "}", r"\toprule",
             " & ".join(["Task"] + [_tex(c) for c in table["columns"]]) + r" \\",
             " & ".join([r"\emph{score rule}"] + [rf"\emph{{{_tex(r)}}}" for r in table["rules"]])
             + r" \\", r"\midrule"]
    for (task, cells), best in zip(table["rows"], table["bold"]):
        cells = [rf"\textbf{{{_tex(c)}}}" if i == best else _tex(c) for i, c in enumerate(cells)]
        lines.append(" & ".join([_tex(task)] + cells) + r" \\")
    lines += [r"\midrule", " & ".join(["IQM / mean"] + [_tex(c) for c in table["summary"]])
              + r" \\", r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def _context(df: pd.DataFrame, methods, models_shared, datasets) -> dict:
    """A table's caption context: whether its methods train models, its tasks' data."""
    ran = df[df.method.isin(methods)]
    tasks = sorted(set(ran.task), key=_task_key)
    return {"models_shared": models_shared,
            "model_based": any(registry.method(m).models for m in set(ran.method)
                               if m in registry.METHODS),
            "physics": physics_note(df[df.method.isin(methods)]),
            "data": data_caption(datasets, tasks),
            "not_published": list(not_published(datasets, tasks))}


def make_tables(df: pd.DataFrame, published: list[Published], rule: str = "final",
                models_shared: bool | None = None,
                datasets: dict[str, dict] | None = None) -> dict[str, dict]:
    """{name: {"title", "table", "markdown", "latex"}} for each family present + 'overall'.
    `datasets`: {task: dataset record} (analysis.datasets), said in each caption."""
    out = {}
    present = set(df.method)
    for base, methods in registry.families().items():
        # A primary family (TD3+BC: TD3+BC, DyDiff-TD3BC) whenever one of it ran; a method's
        # ablation family (DyDiff-TD3BC and its variants) only when a variant ran.
        shown = present & set(methods if registry.method(base).base is None else methods[1:])
        if not shown:
            continue
        title = f"{label(base)} family"
        table = {**build_table(df, methods, published, rule=rule),
                 **_context(df, methods, models_shared, datasets)}
        out[base] = {"title": title, "table": table, "markdown": to_markdown(title, table),
                     "latex": to_latex(title, table, f"dydiff-{base}")}
    methods = ordered(present)
    title = "All methods"
    # Published columns here only for methods without a family table (the family tables hold
    # the TD3+BC / CQL ones), so MOPO / MBPO runs sit next to OfflineRL-Kit and the MOPO paper.
    in_family = {m for members in registry.families().values() for m in members}
    table = build_table(df, methods, published,
                        published_methods=[m for m in methods if m not in in_family],
                        rule=rule)
    table.update(_context(df, methods, models_shared, datasets))
    out["overall"] = {"title": title, "table": table, "markdown": to_markdown(title, table),
                      "latex": to_latex(title, table, "dydiff-overall")}
    return out


def run_tables(score_files: list[Path], out_dir: Path, published: Path | None = None,
               rule: str = "final", models_shared: bool | None = None,
               datasets: dict[str, dict] | None = None) -> dict:
    """Write table_<name>.md / .tex (and tables.md with all of them) into `out_dir`.

    `published` is a published.yaml (default: analysis/published.yaml); `rule` the score rule
    (aggregate.SCORE_RULES); `models_shared` whether the seeds shared their models (said in
    each caption; None: not said); `datasets` each task's dataset record (its data and
    verdict, said in each caption)."""
    df = collect_scores(score_files, rule)
    tables = make_tables(df, load_published(published), rule, models_shared, datasets)
    out_dir = Path(out_dir)
    for name, t in tables.items():
        atomic_write_text(out_dir / f"table_{name}.md", t["markdown"])
        atomic_write_text(out_dir / f"table_{name}.tex", t["latex"])
    atomic_write_text(out_dir / "tables.md", "\n".join(t["markdown"] for t in tables.values()))
    return tables
