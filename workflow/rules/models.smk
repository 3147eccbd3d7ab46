# Models (the registry's: the probabilistic ensemble for MOPO/MBPO, DyDiff's reward and
# diffusion), one per task and seed, or one per task shared by every seed
# (models.shared_across_seeds; harness.plan.model_seed).


rule train_model:
    input:
        out("dataset"),
    output:
        out("model"),
    wildcard_constraints:
        model="|".join(registry.MODELS),
        mseed=r"\d+",
    params:
        job=lambda w: job_param(plan.model_job(config, w.model, w.task, int(w.mseed))),
    threads: lambda w: res(w.model, "threads", 1)
    resources:
        mem_mb=lambda w: res(w.model, "mem_mb", 8000),
        runtime=lambda w: res(w.model, "runtime", 240),
        gpu=lambda w: plan.gpus(config, w.model),
    log:
        out("log_model"),
    shell:
        "dydiff-bench train-model --threads {threads} --job {params.job:q} > {log} 2>&1"
