# Analysis: rliable aggregates over tasks x seeds, paper tables next to published numbers,
# and a summary in words. Reads the evaluation files; never retrains anything.


rule analyze:
    input:
        scores=plan.eval_paths(config),
        rollout_error=plan.analysis_job(config)["rollout_error"],
        # each task's dataset: its record (<task>.data.json, written with it) gives the
        # summary and the captions the data's origin and verdict
        datasets=list(plan.analysis_job(config)["datasets"].values()),
    output:
        aggregate=out("aggregates"),
        intervals=report(out("aggregate_intervals"), category="Aggregate scores",
                         caption="../report/aggregate.rst"),
        profile=report(out("performance_profiles"), category="Aggregate scores",
                       caption="../report/profile.rst"),
        improvement=report(out("improvement"), category="Aggregate scores",
                           caption="../report/improvement.rst"),
        tables=out("tables"),
        summary=out("summary"),
        tables_html=report(out("tables_html"), category="Paper tables",
                           caption="../report/tables.rst"),
        summary_html=report(out("summary_html"), category="Summary",
                            caption="../report/summary.rst"),
    params:
        job=job_param(plan.analysis_job(config)),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=lambda w: res("analysis", "runtime", 60),
    log:
        out("log_analysis"),
    shell:
        "dydiff-bench analyze --threads {threads} --job {params.job:q} > {log} 2>&1"
