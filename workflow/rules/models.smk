# Dynamics models, trained once per task and shared by every policy job that needs them:
# the probabilistic ensemble (MOPO, MBPO), the reward model and the diffusion model (DyDiff).


rule train_model:
    input:
        f"{ROOT}/datasets/{{task}}.hdf5",
    output:
        f"{ROOT}/models/{{model}}/{{task}}/model.pt",
    wildcard_constraints:
        model="ensemble|reward|diffusion",
    params:
        job=lambda w: job_param(jobs.model_job(config, w.model, w.task)),
    threads: lambda w: res(w.model, "threads", 1)
    resources:
        mem_mb=lambda w: res(w.model, "mem_mb", 8000),
        runtime=lambda w: res(w.model, "runtime", 240),
        gpu=lambda w: res(w.model, "gpu", 0),
    log:
        f"{LOGS}/models/{{model}}/{{task}}.log",
    shell:
        "dydiff-bench train-{wildcards.model} --threads {threads} --job {params.job:q} > {log} 2>&1"
