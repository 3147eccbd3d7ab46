"""`dydiff-bench <step>`: the command every Snakemake rule calls, and users can call by hand.

Each step takes either `--job JSON` (the spec the Snakefile built with dydiff.jobs) or
`--configfile config/X.yaml` plus the job's coordinates (--task/--method/--seed), which builds
the very same spec. Steps write into their `out` folder atomically and resume from checkpoints.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from dydiff import jobs
from dydiff.config import ConfigError, config_hash
from dydiff.data.dataset import DatasetError

log = logging.getLogger("dydiff")

STEPS: dict[str, Callable[[dict, Callable | None], dict]] = {}


def step(name: str):
    def register(fn):
        STEPS[name] = fn
        return fn
    return register


# ---- steps -------------------------------------------------------------------------------

@step("generate-datasets")
def generate_datasets(spec: dict, log_fn) -> dict:
    """Build a task family's D4RL-style datasets locally (one online SAC run)."""
    import shutil
    from dydiff.config import from_dict
    from dydiff.data.generate import GenerateConfig, generate_datasets as generate
    gen = from_dict(GenerateConfig, spec["config"]["generate"], where="data.generate")
    paths = generate(spec["family"], spec["kinds"], gen, Path(spec["out"]),
                     seed=spec["config"]["seed"], progress=True)
    summary = {}
    for kind, target in spec["outputs"].items():
        from dydiff.data.d4rl import read_hdf5
        from dydiff.utils import atomic_path
        with atomic_path(target) as tmp:
            shutil.copyfile(paths[kind], tmp)
        info = read_hdf5(target).summary()
        summary[f"{kind}/behaviour_normalized_return"] = info["normalized_return_mean"]
        summary[f"{kind}/transitions"] = info["transitions"]
    return summary


@step("import-dataset")
def import_dataset(spec: dict, log_fn) -> dict:
    """Read a task's dataset from D4RL hdf5 or a local Minari root into the results folder."""
    from dydiff.data.d4rl import write_hdf5
    from dydiff.data.sources import load_dataset
    dataset = load_dataset(spec["config"]["name"])
    dataset.name = spec["task"]
    write_hdf5(dataset, spec["out"], source=str(dataset.source))
    return dataset.summary()


def _model_step(model: str, train: Callable):
    def run(spec: dict, log_fn) -> dict:
        from dydiff.config import from_dict
        from dydiff.data.sources import load_dataset
        dataset = load_dataset(spec["dataset"])
        cls = jobs.import_object(jobs.MODEL_CONFIGS[model])
        cfg = from_dict(cls, spec["config"][model], where=f"models.{model}")
        return train(dataset, cfg, Path(spec["out"]), seed=spec["config"]["seed"],
                     log_fn=log_fn, progress=True)
    return run


@step("train-ensemble")
def train_ensemble(spec, log_fn):
    from baselines.ensemble import train_ensemble as train
    return _model_step("ensemble", train)(spec, log_fn)


@step("train-reward")
def train_reward(spec, log_fn):
    from dydiff.reward_model import train_reward_model as train
    return _model_step("reward", train)(spec, log_fn)


@step("train-diffusion")
def train_diffusion(spec, log_fn):
    from dydiff.diffusion.train import train_diffusion as train
    return _model_step("diffusion", train)(spec, log_fn)


@step("train-policy")
def train_policy(spec: dict, log_fn) -> dict:
    from dydiff.config import from_dict
    from dydiff.data.sources import load_dataset
    from dydiff.rl.train import PolicyConfig, train_policy as train
    dataset = load_dataset(spec["dataset"])
    cfg = from_dict(PolicyConfig, spec["config"]["policy"], where=f"policy[{spec['method']}]")
    return train(spec["method"], dataset, cfg, Path(spec["out"]), seed=spec["seed"],
                 model_dirs={k: Path(v) for k, v in spec["model_dirs"].items()},
                 log_fn=log_fn, progress=True)


@step("evaluate")
def evaluate(spec: dict, log_fn) -> dict:
    """Final evaluation of a trained policy on fresh simulator episodes (writes eval.json)."""
    from dydiff.rl.evaluation import evaluate as run_episodes
    from dydiff.rl.train import load_policy
    from dydiff.utils import atomic_write_text, git_sha
    pdir = Path(spec["policy_dir"])
    agent, method = load_policy(pdir / "policy.pt")
    final = json.loads((pdir / "final.json").read_text())
    start = time.perf_counter()
    result = run_episodes(agent, spec["task"], episodes=spec["config"]["episodes"],
                          seed=spec["config"]["seed"])
    out = {"method": method, "task": spec["task"], "seed": spec["seed"],
           "normalized_score": result["normalized_score"],
           "normalized_score_std": result["normalized_score_std"],
           "return_mean": result["return_mean"], "return_std": result["return_std"],
           "eval_episodes": spec["config"]["episodes"], "episode_lengths": result["lengths"],
           "steps": final["steps"], "train_wall_time_s": final["wall_time_s"],
           "wall_time_s": time.perf_counter() - start, "git_sha": git_sha(),
           "config_hash": final["config_hash"]}
    atomic_write_text(spec["out"], json.dumps(out, indent=2) + "\n")
    return out


@step("rollout-error")
def rollout_error(spec: dict, log_fn) -> dict:
    """Generated vs simulated trajectories over the horizon (diffusion vs ensemble)."""
    from analysis.rollout_error import run_rollout_error
    cfg = spec["config"]
    result = run_rollout_error(spec["dataset"], {k: Path(v) for k, v in spec["model_dirs"].items()},
                               Path(spec["out"]), policy=Path(spec["policy_dir"]) / "policy.pt",
                               agent_loader="dydiff.rl.train:load_agent",
                               horizon=cfg["horizon"], n_starts=cfg["n_starts"], seed=cfg["seed"],
                               reward_dir=Path(spec["reward_dir"]))
    df = result["rollout_error"]
    last = df[df["horizon"] == df["horizon"].max()]
    return {f"{r['mode']}/{r['model']}/state_mse_at_H": float(r["state_mse"])
            for _, r in last.iterrows()}


@step("analyze")
def analyze(spec: dict, log_fn) -> dict:
    """rliable aggregates, paper tables and the summary from the evaluation files."""
    import pandas as pd
    from analysis.aggregate import run_aggregate
    from analysis.summary import write_summary
    from analysis.tables import run_tables
    out, cfg = Path(spec["out"]), spec["config"]
    scores = [Path(p) for p in spec["scores"]]
    aggregates = run_aggregate(scores, out, reps=cfg["reps"], seed=cfg["seed"])
    tables = run_tables(scores, out / "tables")
    rerr = (pd.concat([pd.read_csv(p).assign(task=Path(p).parent.name)
                       for p in spec["rollout_error"]]) if spec["rollout_error"] else None)
    write_summary(aggregates, tables, rerr, out / "summary.md", budget=cfg["name"])
    return {f"{r['method']}/{r['metric']}": float(r["estimate"])
            for _, r in aggregates["aggregates"].iterrows()}


# ---- plumbing ------------------------------------------------------------------------------

def _spec_from_args(args: argparse.Namespace) -> dict:
    if args.job:
        return json.loads(args.job)
    if not args.configfile:
        raise ConfigError("give either --job JSON or --configfile FILE with the job's "
                          "--task (and --method/--seed for policies)")
    cfg = jobs.load_config(args.configfile, _overrides(args.set))
    if not args.task:
        raise ConfigError("--task is required with --configfile")
    name = args.step
    if name == "generate-datasets":
        spec = jobs.generate_job(cfg, jobs.split_task(args.task)[0])
    elif name == "import-dataset":
        spec = jobs.import_job(cfg, args.task)
    elif name.startswith("train-") and name != "train-policy":
        spec = jobs.model_job(cfg, name[len("train-"):], args.task)
    elif name in ("train-policy", "evaluate"):
        if not args.method:
            raise ConfigError(f"--method is required for {name}; known: {list(jobs.METHODS)}")
        spec = (jobs.policy_job if name == "train-policy" else jobs.eval_job)(
            cfg, args.method, args.task, args.seed)
    else:
        raise ConfigError(f"unknown step {name!r}")
    spec.update(jobs.run_context(cfg))
    return spec


def _overrides(items: list[str] | None) -> dict:
    """['a.b=3', 'seeds=[0,1]'] -> {'a': {'b': 3}, 'seeds': [0, 1]} (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def run_step(spec: dict) -> dict:
    """Run one job spec under its MLflow run (unless tracking is off)."""
    from dydiff import tracking
    from dydiff.utils import git_sha
    fn = STEPS[spec["step"]]
    tags = {"step": spec["step"], "task": spec.get("task", ""),
            "method": spec.get("method", spec["step"].removeprefix("train-")),
            "seed": spec.get("seed", spec.get("config", {}).get("seed", "")),
            "git_sha": git_sha(), "config_hash": config_hash(spec.get("config", {})),
            "dag_run": os.environ.get("DYDIFF_DAG_RUN", "manual")}
    run_name = "/".join(str(x) for x in (spec["step"], spec.get("method"), spec.get("task"),
                                         f"seed{spec['seed']}" if "seed" in spec else None)
                        if x)
    out = Path(spec["out"])
    out_dir = out if not out.suffix else out.parent
    # A step writing one file (evaluate -> eval.json) shares its folder with another job's run:
    # its own run id sits next to its file.
    id_name = "mlflow_run_id" if not out.suffix else f"{out.stem}.mlflow_run_id"
    start = time.time()
    if os.environ.get("DYDIFF_MLFLOW", "1") == "0":
        result = fn(spec, None)
    else:
        artifacts = lambda: [out] if out.suffix else sorted(  # noqa: E731
            p for p in out_dir.glob("*") if p.suffix in (".parquet", ".json", ".png", ".pdf",
                                                         ".csv"))
        with tracking.job_run(experiment=spec["experiment"], run_name=run_name,
                              params=spec.get("config", {}), tags=tags, out_dir=out_dir,
                              uri=tracking.default_uri(spec.get("results_dir", "results")),
                              id_name=id_name,
                              artifacts=artifacts) as log_fn:
            result = fn(spec, log_fn)
            finals = {f"final/{k}": v for k, v in (result or {}).items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)}
            log_fn(finals, int(result.get("steps", 0)) if result else 0)
    log.info("%s finished in %.1f s", run_name, time.time() - start)
    return result


def cmd_init_tracking(args) -> int:
    """Create the MLflow store and the experiment once, before parallel jobs start."""
    from dydiff import tracking
    cfg = jobs.load_config(args.configfile, _overrides(args.set))
    for key, value in jobs.tracking_env(cfg).items():
        os.environ.setdefault(key, value)
    uri = tracking.init_experiment(cfg)
    print(f"MLflow store ready: {uri} (experiment {cfg['name']!r})")
    return 0


def cmd_check_config(args) -> int:
    """Validate a config and list the job grid it defines."""
    cfg = jobs.load_config(args.configfile, _overrides(args.set))
    grid = jobs.all_jobs(cfg)
    counts: dict[str, int] = {}
    for spec in grid:
        counts[spec["step"]] = counts.get(spec["step"], 0) + 1
    print(f"config {args.configfile} is valid: {len(cfg['tasks'])} task(s) x "
          f"{len(cfg['methods'])} method(s) x {len(cfg['seeds'])} seed(s)")
    for name, n in counts.items():
        print(f"  {name:<20} {n} job(s)")
    return 0


def cmd_where(args) -> int:
    """Print where the report, tables, figures and MLflow store of a config are."""
    cfg = jobs.load_config(args.configfile, _overrides(args.set))
    root = jobs.results_root(cfg)
    from dydiff.tracking import default_uri
    uri = default_uri(cfg.get("results_dir", "results"))
    print(f"""
Results of {cfg['name']!r}:
  report        {Path(cfg.get('results_dir', 'results')) / 'report.html'}
  summary       {root / 'analysis' / 'summary.md'}
  tables        {root / 'analysis' / 'tables'}
  figures       {root / 'analysis'}
  per-job runs  {root / 'policies'}
  MLflow        {uri}
                browse: mlflow ui --backend-store-uri {uri}
""")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dydiff-bench",
        description="Run one step of the dydiff-bench pipeline (the Snakefile calls these).")
    sub = parser.add_subparsers(dest="step", required=True)
    for name in list(STEPS):
        p = sub.add_parser(name, help=(STEPS[name].__doc__ or name).strip().splitlines()[0])
        p.add_argument("--job", help="job spec as JSON (what the Snakefile passes)")
        p.add_argument("--configfile", help="experiment config YAML (e.g. config/smoke.yaml)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config value, e.g. --set policy.offline.total_steps=500")
        p.add_argument("--task", help="D4RL-style task, e.g. hopper-medium-replay")
        p.add_argument("--method", choices=jobs.METHODS)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=None,
                       help="torch intra-op threads (default: torch's own choice)")
    extra = {"init-tracking": cmd_init_tracking, "check-config": cmd_check_config,
             "where": cmd_where}
    for name, fn in extra.items():
        p = sub.add_parser(name, help=fn.__doc__.strip().splitlines()[0])
        p.add_argument("--configfile", required=True, help="experiment config YAML")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if args.step in extra:
            return extra[args.step](args) or 0
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        spec = _spec_from_args(args)
        result = run_step(spec)
        print(json.dumps(result, indent=2, default=str))
        return 0
    except (ConfigError, DatasetError) as err:
        print(f"dydiff-bench {args.step}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
