# Shared helpers for the rules: job specs as shell-quoted JSON, resources from the config.
import json
import shlex

localrules: all


def job_param(spec):
    """A job spec as the JSON the rule passes to the CLI; as a param, a change reruns the job."""
    return json.dumps({**spec, **jobs.run_context(config)}, sort_keys=True)


def res(kind, key, default):
    """resources.<kind>.<key> from the config (e.g. resources.diffusion.gpu)."""
    return (config.get("resources") or {}).get(kind, {}).get(key, default)


def final_outputs():
    outs = expand(f"{ROOT}/policies/{{method}}/{{task}}/seed{{seed}}/eval.json",
                  method=config["methods"], task=config["tasks"], seed=config["seeds"])
    outs += analysis_outputs()
    return outs


# MLflow settings reach the jobs through the environment (not params: they must not rerun jobs).
for _key, _value in jobs.tracking_env(config).items():
    os.environ.setdefault(_key, _value)


onstart:
    # Create the MLflow store once, before parallel jobs: concurrent first use of a fresh
    # sqlite store crashes in MLflow's schema migration.
    from dydiff import tracking
    tracking.init_experiment(config)


onsuccess:
    print(f"\ndydiff-bench: done. Build the HTML report with:\n"
          f"  snakemake --report results/report.html\n"
          f"Summary: {ROOT}/analysis/summary.md   MLflow: see `dydiff-bench where`")
