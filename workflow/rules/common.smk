# Shared helpers for the rules: paths from harness.plan, job specs as JSON, resources.
import json

localrules: all


def out(kind):
    """An output pattern of harness.plan.PATHS under this config's results folder."""
    return plan.pattern(config, kind)


def job_param(spec):
    """A job spec as the JSON the rule passes to the CLI; as a param, a change reruns the job."""
    return json.dumps(plan.with_context(config, spec), sort_keys=True)


def res(kind, key, default):
    """resources.<kind>.<key> from the config (e.g. resources.diffusion.gpu)."""
    return (config.get("resources") or {}).get(kind, {}).get(key, default)


def final_outputs():
    outs = plan.eval_paths(config) + [str(plan.path(config, "summary"))]
    if plan.rollout_error_enabled(config):
        outs += [str(plan.path(config, "rollout_error_csv", task=t)) for t in config["tasks"]]
    return outs


# MLflow settings reach the jobs through the environment (not params: they must not rerun jobs).
for _key, _value in plan.tracking_env(config).items():
    os.environ.setdefault(_key, _value)


onstart:
    # Every D4RL / Minari dataset the grid still has to import is looked up now: all missing
    # ones in one message rather than one failed job each, hours apart.
    try:
        plan.check_datasets(config)
    except ConfigError as err:
        sys.exit(f"Invalid config: {err}")
    # Create the MLflow store once, before parallel jobs: concurrent first use of a fresh
    # sqlite store crashes in MLflow's schema migration.
    from harness import tracking
    tracking.init_experiment(config)


onsuccess:
    print(f"\ndydiff-bench: done. Build the HTML report with:\n"
          f"  snakemake --report results/report.html\n"
          f"Summary: {plan.path(config, 'summary')}   MLflow: see `dydiff-bench where`")
