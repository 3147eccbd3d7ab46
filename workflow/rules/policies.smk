# Policy training per (method, task, seed) with the shared offline loop, then a final
# evaluation in the MuJoCo simulator on fresh episodes.


def policy_inputs(w):
    spec = jobs.policy_job(config, w.method, w.task, int(w.seed))
    return [spec["dataset"]] + [f"{d}/model.pt" for d in spec["model_dirs"].values()]


rule train_policy:
    input:
        policy_inputs,
    output:
        f"{ROOT}/policies/{{method}}/{{task}}/seed{{seed}}/final.json",
        f"{ROOT}/policies/{{method}}/{{task}}/seed{{seed}}/policy.pt",
    wildcard_constraints:
        seed=r"\d+",
    params:
        job=lambda w: job_param(jobs.policy_job(config, w.method, w.task, int(w.seed))),
    threads: lambda w: res("policy", "threads", 1)
    resources:
        mem_mb=lambda w: res("policy", "mem_mb", 8000),
        runtime=lambda w: res("policy", "runtime", 720),
        gpu=lambda w: res("policy", "gpu", 0),
    log:
        f"{LOGS}/policies/{{method}}/{{task}}/seed{{seed}}.log",
    shell:
        "dydiff-bench train-policy --threads {threads} --job {params.job:q} > {log} 2>&1"


rule evaluate:
    input:
        f"{ROOT}/policies/{{method}}/{{task}}/seed{{seed}}/policy.pt",
    output:
        f"{ROOT}/policies/{{method}}/{{task}}/seed{{seed}}/eval.json",
    params:
        job=lambda w: job_param(jobs.eval_job(config, w.method, w.task, int(w.seed))),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=lambda w: res("evaluate", "runtime", 30),
    log:
        f"{LOGS}/evaluate/{{method}}/{{task}}/seed{{seed}}.log",
    shell:
        "dydiff-bench evaluate --threads {threads} --job {params.job:q} > {log} 2>&1"
