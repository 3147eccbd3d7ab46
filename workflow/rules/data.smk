# Datasets: generated locally from gymnasium MuJoCo (one online SAC run per task family
# yields all its kinds), or imported from D4RL hdf5 files / a local Minari root.

if jobs.data_source(config) == "local":
    for _family in jobs.families(config):

        rule:
            name:
                f"generate_{_family}_datasets"
            output:
                list(jobs.generate_job(config, _family)["outputs"].values()),
            params:
                job=job_param(jobs.generate_job(config, _family)),
            threads: 1
            resources:
                mem_mb=res("dataset", "mem_mb", 4000),
                runtime=res("dataset", "runtime", 120),
            log:
                f"{LOGS}/datasets/{_family}.log",
            shell:
                "dydiff-bench generate-datasets --threads {threads} --job {params.job:q} > {log} 2>&1"

else:

    rule import_dataset:
        output:
            f"{ROOT}/datasets/{{task}}.hdf5",
        params:
            job=lambda w: job_param(jobs.import_job(config, w.task)),
        threads: 1
        resources:
            mem_mb=res("dataset", "mem_mb", 8000),
            runtime=res("dataset", "runtime", 30),
        log:
            f"{LOGS}/datasets/{{task}}.log",
        shell:
            "dydiff-bench import-dataset --threads {threads} --job {params.job:q} > {log} 2>&1"
