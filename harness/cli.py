"""`dydiff-bench <step>`: the command every Snakemake rule calls, and users can call by hand.

Parsing and dispatch only. A step takes either `--job JSON` (the spec the Snakefile built with
harness.plan) or `--configfile config/X.yaml` plus the job's coordinates (--task, --method,
--model, --seed), from which harness.plan builds the very same spec; harness.runner runs it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from harness import plan, registry
from harness.config import ConfigError, overrides_from_pairs
from harness.data.dataset import DatasetError

STEP_HELP = {
    "generate-datasets": "build a task family's D4RL-style datasets locally (one online SAC run)",
    "import-dataset": "read a task's dataset from D4RL hdf5 or a local Minari root",
    "train-model": "train a dynamics/reward model of a task (--model)",
    "train-policy": "train a method on a task with one seed",
    "evaluate": "evaluate a trained policy on fresh simulator episodes (eval.json)",
    "rollout-error": "generated vs simulated trajectories over the horizon",
    "analyze": "rliable aggregates, paper tables and the summary from the evaluation files",
}


def _config(args) -> dict:
    return plan.load_config(args.configfile, overrides_from_pairs(args.set))


def _spec(args) -> dict:
    if args.job:
        return json.loads(args.job)
    if not args.configfile:
        raise ConfigError("give either --job JSON or --configfile FILE with the job's "
                          "--task (and --method/--model/--seed)")
    cfg = _config(args)
    spec = plan.job_for(cfg, args.step, task=args.task, method=args.method, seed=args.seed,
                        model=args.model)
    return plan.with_context(cfg, spec)


def cmd_init_tracking(args) -> int:
    """Create the MLflow store and the experiment once, before parallel jobs start."""
    from harness import tracking
    cfg = _config(args)
    for key, value in plan.tracking_env(cfg).items():
        os.environ.setdefault(key, value)
    uri = tracking.init_experiment(cfg)
    print(f"MLflow store ready: {uri} (experiment {cfg['name']!r})")
    return 0


def cmd_check_config(args) -> int:
    """Validate a config (and that its D4RL / Minari datasets are there) and list the job
    grid it defines."""
    cfg = _config(args)
    counts: dict[str, int] = {}
    for spec in plan.all_jobs(cfg):
        counts[spec["step"]] = counts.get(spec["step"], 0) + 1
    print(f"config {args.configfile} is valid: {len(cfg['tasks'])} task(s) x "
          f"{len(cfg['methods'])} method(s) x {len(cfg['seeds'])} seed(s)")
    print(f"  methods: {', '.join(cfg['methods'])}")
    for name, n in counts.items():
        print(f"  {name:<20} {n} job(s)")
    try:  # after the listing: the grid is worth seeing before its data is there
        plan.check_datasets(cfg)
    except ConfigError as err:
        raise ConfigError(f"{args.configfile}: {err}") from None
    return 0


def cmd_where(args) -> int:
    """Print where the report, tables, figures and MLflow store of a config are."""
    from harness.tracking import default_uri
    cfg = _config(args)
    results = Path(cfg.get("results_dir", "results"))
    uri = default_uri(results)
    print(f"""
Results of {cfg['name']!r}:
  report        {results / 'report.html'}
  summary       {plan.path(cfg, 'summary')}
  tables        {plan.path(cfg, 'tables').parent}
  figures       {plan.path(cfg, 'analysis_dir')}
  per-job runs  {plan.results_root(cfg) / 'policies'}
  MLflow        {uri}
                browse: mlflow ui --backend-store-uri {uri}
""")
    return 0


def _analysis_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from-mlflow", nargs="?", const="", metavar="URI",
                   help="read the evaluated runs from an MLflow store or server instead of the "
                        "result files (default URI: $MLFLOW_TRACKING_URI, else "
                        "sqlite:///<results_dir>/mlflow.db)")
    p.add_argument("--experiment", action="append", metavar="NAME",
                   help="with --from-mlflow: experiment(s) to read, repeatable (default: the "
                        "config's name)")
    p.add_argument("--filter", default="", metavar="SEARCH",
                   help="with --from-mlflow: MLflow search string narrowing the runs, e.g. "
                        "\"tags.dag_run = '20250101-120000-ab12'\"")
    p.add_argument("--out", help="with --from-mlflow: output folder (default: "
                                 "<results_dir>/<experiment>/analysis-mlflow)")


def _mlflow_analysis_spec(args) -> dict:
    """`analyze --from-mlflow`: the analysis job of --configfile (its settings and task order)
    or of analysis defaults, reading its inputs from MLflow runs; never logs a run itself."""
    from harness import tracking
    cfg = _config(args) if args.configfile else None
    experiments = args.experiment or ([cfg["name"]] if cfg else None)
    if not experiments:
        raise ConfigError("analyze --from-mlflow needs --experiment NAME (or --configfile)")
    results = Path(cfg.get("results_dir", "results")) if cfg else Path("results")
    spec = plan.analysis_job(cfg) if cfg else {
        "step": "analyze", "config": {"reps": 2000, "seed": 0, "name": "+".join(experiments)}}
    # URI: given, else where the jobs log (MLFLOW_TRACKING_URI, the config's, the sqlite store)
    configured = ((cfg or {}).get("mlflow") or {}).get("tracking_uri")
    uri = args.from_mlflow or os.environ.get("MLFLOW_TRACKING_URI") or configured \
        or tracking.default_uri(results)
    return {**spec, "scores": [], "rollout_error": [], "tasks": cfg["tasks"] if cfg else None,
            "mlflow": {"uri": uri, "experiments": experiments, "filter": args.filter},
            "out": args.out or str(results / "+".join(experiments) / "analysis-mlflow")}


def _analyze_from_mlflow(args) -> int:
    from mlflow.exceptions import MlflowException
    spec = _mlflow_analysis_spec(args)
    try:
        result = registry.resolve(registry.STEPS["analyze"])(spec, None)
    except (ValueError, MlflowException) as err:  # no such experiment / runs, a bad --filter
        print(f"dydiff-bench analyze: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    print(f"analysis of {spec['mlflow']['uri']} {spec['mlflow']['experiments']} written to "
          f"{spec['out']}")
    return 0


def cmd_estimate(args) -> int:
    """Print the grid's expected CPU-/GPU-hours and wall time per rule, before running it."""
    estimate = registry.resolve("analysis.estimate:estimate")
    command = "dydiff-bench estimate --configfile " + args.configfile + "".join(
        f" --set {s}" for s in args.set or []) + " --measure"
    print(estimate(_config(args), config_name=args.configfile, profile=args.profile,
                   cores=args.cores, jobs=args.jobs, measure_missing_items=args.measure,
                   threads=args.threads or 1, command=command,
                   log=lambda msg: print(msg, file=sys.stderr)))
    return 0


def _estimate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", help="a workflow profile (local, slurm): its `jobs` is the "
                                     "parallelism of the wall-time estimate")
    p.add_argument("--cores", type=int, help="cores shared by the jobs' threads (default: this "
                                            "machine's CPUs; without a profile's `jobs`)")
    p.add_argument("--jobs", type=int, help="jobs at once (a cluster queue); overrides --profile")
    p.add_argument("--measure", action="store_true",
                   help="time every work item the throughput table lacks on this machine and "
                        "add the rows (seconds to minutes; paper sizes take longest)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for --measure (default 1)")


COMMANDS = {"init-tracking": cmd_init_tracking, "check-config": cmd_check_config,
            "where": cmd_where, "estimate": cmd_estimate}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="dydiff-bench",
        description="Run one step of the dydiff-bench pipeline (the Snakefile calls these).")
    sub = top.add_subparsers(dest="step", required=True)
    for name in registry.STEPS:
        p = sub.add_parser(name, help=STEP_HELP.get(name, name))
        p.add_argument("--job", help="job spec as JSON (what the Snakefile passes)")
        p.add_argument("--configfile", help="experiment config YAML (e.g. config/smoke.yaml)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config value, e.g. --set policy.offline.total_steps=500")
        p.add_argument("--task", help="D4RL-style task, e.g. hopper-medium-replay")
        p.add_argument("--method", choices=list(registry.METHODS))
        p.add_argument("--model", choices=list(registry.MODELS))
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=None,
                       help="torch intra-op threads (default: torch's own choice)")
        p.add_argument("--device", default=None, metavar="DEVICE",
                       help="cpu, cuda or cuda:N: overrides the device the plan gives the job "
                            "(devices.<kind> in the config; default cuda where the rule asks "
                            "for a GPU, else cpu)")
        if name == "analyze":
            _analysis_source_args(p)
    for name, fn in COMMANDS.items():
        p = sub.add_parser(name, help=fn.__doc__.strip().splitlines()[0])
        p.add_argument("--configfile", required=True, help="experiment config YAML")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config value")
        if name == "estimate":
            _estimate_args(p)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if args.step in COMMANDS:
            return COMMANDS[args.step](args) or 0
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        if getattr(args, "from_mlflow", None) is not None:
            return _analyze_from_mlflow(args)
        from harness.runner import run_job
        spec = _spec(args)
        if getattr(args, "device", None):
            from harness.runtime import check_device_name
            spec["device"] = check_device_name(args.device, "--device")
        result = run_job(spec)
        print(json.dumps(result, indent=2, default=str))
        return 0
    except (ConfigError, DatasetError) as err:
        print(f"dydiff-bench {args.step}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
