# Policy training per (method, task, seed) with the shared offline loop, then a final
# evaluation in the MuJoCo simulator on fresh episodes.


def policy_inputs(w):
    spec = plan.policy_job(config, w.method, w.task, int(w.seed))
    return [spec["dataset"]] + [f"{d}/model.pt" for d in spec["model_dirs"].values()]


rule train_policy:
    input:
        policy_inputs,
    output:
        out("final"),
        out("policy"),
    wildcard_constraints:
        seed=r"\d+",
    params:
        job=lambda w: job_param(plan.policy_job(config, w.method, w.task, int(w.seed))),
    threads: lambda w: res("policy", "threads", 1)
    resources:
        mem_mb=lambda w: res("policy", "mem_mb", 8000),
        runtime=lambda w: res("policy", "runtime", 720),
        gpu=lambda w: plan.gpus(config, "policy", w.method),
    log:
        out("log_policy"),
    shell:
        "dydiff-bench train-policy --threads {threads} --job {params.job:q} > {log} 2>&1"


rule evaluate:
    input:
        out("final"),
        out("policy"),
    output:
        out("eval"),
    params:
        job=lambda w: job_param(plan.eval_job(config, w.method, w.task, int(w.seed))),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=lambda w: res("evaluate", "runtime", 30),
        gpu=lambda w: plan.gpus(config, "evaluate", w.method),
    log:
        out("log_evaluate"),
    shell:
        "dydiff-bench evaluate --threads {threads} --job {params.job:q} > {log} 2>&1"
