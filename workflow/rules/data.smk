# Datasets: generated locally from gymnasium MuJoCo (one online SAC run per task family
# yields all its kinds), or imported from D4RL hdf5 files / a local Minari root.

if plan.data_source(config) == "local":
    for _family in plan.families(config):

        rule:
            name:
                f"generate_{_family}_datasets"
            output:
                list(plan.generate_job(config, _family)["outputs"].values()),
            params:
                job=job_param(plan.generate_job(config, _family)),
            threads: 1
            resources:
                mem_mb=res("dataset", "mem_mb", 4000),
                runtime=res("dataset", "runtime", 120),
            log:
                str(plan.path(config, "log_generate", family=_family)),
            shell:
                "dydiff-bench generate-datasets --threads {threads} --job {params.job:q} > {log} 2>&1"

else:

    rule import_dataset:
        output:
            out("dataset"),
        params:
            job=lambda w: job_param(plan.import_job(config, w.task)),
        threads: 1
        resources:
            mem_mb=res("dataset", "mem_mb", 8000),
            runtime=res("dataset", "runtime", 30),
        log:
            out("log_import"),
        shell:
            "dydiff-bench import-dataset --threads {threads} --job {params.job:q} > {log} 2>&1"
