# Analysis: rliable aggregates over tasks x seeds, paper tables next to published numbers,
# and a summary in words. Reads the evaluation files; never retrains anything.

ANALYSIS = f"{ROOT}/analysis"


def analysis_outputs():
    outs = [f"{ANALYSIS}/summary.md"]
    if jobs.rollout_error_enabled(config):
        outs += expand(f"{ROOT}/rollout_error/{{task}}/rollout_error.csv", task=config["tasks"])
    return outs


rule analyze:
    input:
        scores=jobs.eval_paths(config),
        rollout_error=jobs.analysis_job(config)["rollout_error"],
    output:
        aggregate=f"{ANALYSIS}/aggregates.csv",
        intervals=report(f"{ANALYSIS}/aggregate_intervals.png", category="Aggregate scores",
                         caption="../report/aggregate.rst"),
        profile=report(f"{ANALYSIS}/performance_profiles.png", category="Aggregate scores",
                       caption="../report/profile.rst"),
        improvement=report(f"{ANALYSIS}/improvement_probability.png",
                           category="Aggregate scores", caption="../report/improvement.rst"),
        tables=report(f"{ANALYSIS}/tables/tables.md", category="Paper tables",
                      caption="../report/tables.rst"),
        summary=report(f"{ANALYSIS}/summary.md", category="Summary",
                       caption="../report/summary.rst"),
    params:
        job=job_param(jobs.analysis_job(config)),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=lambda w: res("analysis", "runtime", 60),
    log:
        f"{LOGS}/analysis.log",
    shell:
        "dydiff-bench analyze --threads {threads} --job {params.job:q} > {log} 2>&1"
