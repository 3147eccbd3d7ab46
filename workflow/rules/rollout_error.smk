# Rollout-error study: diffusion vs ensemble trajectories against the MuJoCo simulator, fed
# the dataset's actions and a trained policy's actions, error over the horizon.


def rollout_error_inputs(w):
    spec = plan.rollout_error_job(config, w.task)
    return [spec["dataset"]] + [f for run in spec["runs"] for f in (
        f"{run['policy_dir']}/policy.pt", *(f"{d}/model.pt" for d in run["model_dirs"].values()))]


rule rollout_error:
    input:
        rollout_error_inputs,
    output:
        out("rollout_error_csv"),
        report(out("rollout_error_png"), caption="../report/rollout_error.rst",
               category="Rollout error", subcategory="{task}"),
        report(out("rollout_error_at_h_png"), caption="../report/rollout_error_at_h.rst",
               category="Rollout error", subcategory="{task}"),
    params:
        job=lambda w: job_param(plan.rollout_error_job(config, w.task)),
    threads: 1
    resources:
        mem_mb=8000,
        runtime=lambda w: res("rollout_error", "runtime", 60),
        gpu=lambda w: plan.gpus(config, "rollout_error"),
    log:
        out("log_rollout_error"),
    shell:
        "dydiff-bench rollout-error --threads {threads} --job {params.job:q} > {log} 2>&1"
