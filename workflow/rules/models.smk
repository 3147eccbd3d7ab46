# Models, trained once per task and shared by every policy job that needs them (the
# registry's models: the probabilistic ensemble for MOPO/MBPO, DyDiff's reward and diffusion).


rule train_model:
    input:
        out("dataset"),
    output:
        out("model"),
    wildcard_constraints:
        model="|".join(registry.MODELS),
    params:
        job=lambda w: job_param(plan.model_job(config, w.model, w.task)),
    threads: lambda w: res(w.model, "threads", 1)
    resources:
        mem_mb=lambda w: res(w.model, "mem_mb", 8000),
        runtime=lambda w: res(w.model, "runtime", 240),
        gpu=lambda w: res(w.model, "gpu", 0),
    log:
        out("log_model"),
    shell:
        "dydiff-bench train-model --threads {threads} --job {params.job:q} > {log} 2>&1"
