"""Config validation at the edge: wrong keys/values fail before any job, in one line naming the
file and the key."""
import pytest

from harness import plan, registry
from harness.config import ConfigError, from_dict, overrides_from_pairs, typed
from harness.training.offline_loop import OfflineConfig

SMOKE = "config/smoke.yaml"
METHODS = str(list(registry.METHODS))  # every registered method and variant


def test_smoke_and_paper_configs_are_valid():
    for path in (SMOKE, "config/paper.yaml"):
        cfg = plan.load_config(path)
        assert plan.all_jobs(cfg)


@pytest.mark.parametrize("override, line", [
    ({"methods": ["td3bc", "dreamer"]}, f"methods[1]: 'dreamer' is not one of {METHODS}"),
    ({"tasks": ["ant-medium"]},
     "tasks: unknown task 'ant-medium': known task families are ['halfcheetah', 'hopper', "
     "'maze2d', 'walker2d'] (dataset names like 'hopper-medium-v2', "
     "'mujoco/hopper/medium-v0' or 'maze2d-umaze-v1')"),
    ({"tasks": ["hopper-mediocre"]},
     "tasks: 'hopper-mediocre' has unknown dataset kind 'mediocre'; known hopper kinds: "
     "['random', 'medium', 'medium-replay', 'medium-expert', 'expert']"),
    ({"tasks": ["maze2d-tiny"]},
     "tasks: 'maze2d-tiny' has unknown dataset kind 'tiny'; known maze2d kinds: ['umaze', "
     "'medium', 'large', 'umaze-dense', 'medium-dense', 'large-dense']"),
    ({"seeds": [-1]}, "seeds[0]: -1 is less than the minimum of 0"),
    ({"seeds": [0, 0]}, "seeds: [0, 0] has non-unique elements"),
    ({"learning_rate": 3},
     "learning_rate: unknown key; known: ['ablations', 'analysis', 'data', 'deterministic', "
     "'devices', 'evaluation', 'extends', 'levers', 'methods', 'mlflow', "
     "'models', 'name', 'per_task', 'policy', 'resources', 'results_dir', 'rollout_error', "
     "'seeds', 'tasks']"),
    ({"policy": {"offline": {"real_ratio": 1.5}}},
     "policy.methods.td3bc.offline.real_ratio: must be in [0, 1], got 1.5"),
    ({"policy": {"td3bc": {"alpha": "big"}}},
     "policy.methods.td3bc.td3bc.alpha: expected a number, got 'big'"),
    ({"per_task": {"walker2d-medium": {}}},
     "per_task: override(s) for task(s) ['walker2d-medium'] not in tasks"),
    ({"policy": {"methods": {"dreamer": {}}}},
     f"policy.methods: 'dreamer' is not one of {METHODS}"),
    ({"rollout_error": {"policy_method": "dreamer"}},
     "rollout_error.policy_method: 'dreamer' is not one of methods ['td3bc', 'cql', 'mopo', "
     "'mbpo', 'dydiff-td3bc', 'dydiff-cql']"),
    ({"policy": {"methods": {"mopo": {"rollout": {"rollout_length": -1}}}}},
     "policy.methods.mopo.rollout.rollout_length: must be >= 1, got -1"),
    ({"policy": {"methods": {"mbpo": {"rollout": {"penalty_coef": 2.0}}}}},
     "policy.methods.mbpo.rollout: ['penalty_coef'] cannot be set: mbpo is defined by "
     "{'penalty_coef': 0.0}"),
    ({"policy": {"methods": {"td3bc": {"rollout": {"a": 1}}}}},
     "policy.methods.td3bc.rollout: td3bc is model-free and takes no rollout settings"),
    ({"data": {"source": "s3"}}, "data.source: 's3' is not one of ['local', 'd4rl', 'minari', 'files']"),
    ({"levers": {"diffusion_sample": "fp16"}},
     "levers.diffusion_sample: 'fp16' is not one of ['fp32', 'tf32_conv', 'tf32', 'bf16']"),
    ({"levers": {"agents": "bf16"}}, "levers.agents: 'bf16' is not one of ['fp32', 'tf32']"),
    ({"levers": {"compile": True}},
     "levers.compile: unknown key; known: ['agents', 'compile_sample', 'compile_train', "
     "'diffusion_sample', 'diffusion_train']"),
    ({"methods": ["td3bc"], "policy": {"methods": {"mopo": {"offline": {"total_steps": 5}}}}},
     "policy.methods: settings for method(s) ['mopo'], which the grid does not run "
     "(methods: ['td3bc'])"),
    ({"tasks": ["hopper-medium"], "methods": ["td3bc"],
      "per_task": {"hopper-medium": {"policy": {"methods": {"cql": {}}}}}},
     "per_task.hopper-medium.policy.methods: settings for method(s) ['cql'], which the grid "
     "does not run (methods: ['td3bc'])"),
])
def test_bad_values_are_one_line_naming_file_and_key(override, line):
    with pytest.raises(ConfigError) as err:
        plan.load_config(SMOKE, override)
    assert str(err.value) == f"{SMOKE}: {line}"


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntasks: [hopper-medium\nseeds: [0]\n")
    with pytest.raises(ConfigError) as err:
        plan.load_config(bad)
    assert str(err.value).startswith(f"{bad}:3: not valid YAML: ")
    with pytest.raises(ConfigError, match="does not exist"):
        plan.load_config(tmp_path / "missing.yaml")


def test_from_dict_types_and_unknown_keys():
    cfg = from_dict(OfflineConfig, {"total_steps": 10, "real_ratio": 1}, where="offline")
    assert cfg.total_steps == 10 and cfg.real_ratio == 1.0
    with pytest.raises(ConfigError, match=r"offline.total_steps: expected an integer"):
        from_dict(OfflineConfig, {"total_steps": 1.5}, where="offline")
    with pytest.raises(ConfigError, match=r"offline: unknown key\(s\) \['steps'\]"):
        from_dict(OfflineConfig, {"steps": 1}, where="offline")


def test_per_task_overrides_reach_only_that_task():
    cfg = plan.load_config(SMOKE)
    task, other = cfg["tasks"][:2]
    cfg["per_task"] = {task: {"policy": {"offline": {"batch_size": 7}}}}
    a = plan.policy_job(cfg, "td3bc", task, 0)["config"]["policy"]["offline"]["batch_size"]
    b = plan.policy_job(cfg, "td3bc", other, 0)["config"]["policy"]["offline"]["batch_size"]
    assert a == 7 and b != 7


def _specs(cfg):
    return {(s["step"], s.get("method") or s.get("model"), s.get("task"), s.get("seed")): s
            for s in plan.all_jobs(cfg)}


def test_changing_one_agent_changes_only_the_jobs_that_train_it():
    cfg = plan.load_config(SMOKE)
    before = _specs(cfg)
    cfg["policy"].setdefault("cql", {})["cql_weight"] = 1.0
    changed = {k for k, v in _specs(cfg).items() if before[k] != v}
    assert {k[1] for k in changed} == {"cql", "dydiff-cql"}
    assert {k[0] for k in changed} == {"train-policy"}


def test_final_episodes_changes_only_evaluation_specs():
    cfg = plan.load_config(SMOKE)
    before = _specs(cfg)
    cfg["evaluation"] = {"final_episodes": 3}
    changed = {k for k, v in _specs(cfg).items() if before[k] != v}
    assert {k[0] for k in changed} == {"evaluate"}
    assert len(changed) == len(cfg["methods"]) * len(cfg["tasks"]) * len(cfg["seeds"])


def test_overrides_parse_yaml_values_the_same_on_both_front_ends():
    assert overrides_from_pairs(["seeds=[0,1,2]", "policy.offline.total_steps=500",
                                 "policy.sac.actor_lr=1e-4"]) == {
        "seeds": [0, 1, 2], "policy": {"offline": {"total_steps": 500},
                                       "sac": {"actor_lr": 1e-4}}}
    # `snakemake --config` hands nested values over as strings
    assert typed({"seeds": ["0", "1"], "mlflow": {"enabled": "false"}, "x": "1e-4"}) == {
        "seeds": [0, 1], "mlflow": {"enabled": False}, "x": 1e-4}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        overrides_from_pairs(["seeds"])


def test_paper_config_uses_mopo_grid_settings_per_task():
    """OfflineRL-Kit's -v2 values, the MOPO authors' for the random datasets (baselines/mopo.py
    grid_settings; every value with its source: tests/test_reference_settings.py)."""
    from baselines.mopo import grid_settings
    cfg = plan.load_config("config/paper.yaml")
    for task in cfg["tasks"]:
        _, want = grid_settings(task)
        mopo = plan.policy_job(cfg, "mopo", task, 0)["config"]["policy"]["rollout"]
        mbpo = plan.policy_job(cfg, "mbpo", task, 0)["config"]["policy"]["rollout"]
        assert {k: mopo[k] for k in want} == want, task
        assert mbpo["rollout_length"] == want["rollout_length"]
        assert (mbpo["penalty"], mbpo["penalty_coef"]) == ("none", 0.0)


def test_paper_grid_job_counts():
    """15 tasks (12 MuJoCo, 3 maze2d) x 13 methods (cql-corl: CQL with CORL's settings;
    diffql, dydiff-diffql, its hardmax variant and diffql-wang) x 5 seeds, D4RL files imported,
    every model (MOPO's ensemble, DyDiff's ensemble-dydiff, reward, diffusion) once per task and
    seed."""
    cfg = plan.load_config("config/paper.yaml")
    counts: dict[str, int] = {}
    for spec in plan.all_jobs(cfg):
        counts[spec["step"]] = counts.get(spec["step"], 0) + 1
    assert counts == {"import-dataset": 15, "train-model": 4 * 15 * 5, "train-policy": 975,
                      "evaluate": 975, "rollout-error": 15, "analyze": 1}


def test_models_per_seed_or_shared():
    """Per seed (the default): each run seed's policies use models trained with that seed, in
    their own folders; shared: one model per task (models.seed) for every seed."""
    task = "hopper-medium-replay"
    cfg = plan.load_config("tests/configs/tiny.yaml", {"seeds": [0, 1]})
    models = [s for s in plan.all_jobs(cfg) if s["step"] == "train-model" and s["task"] == task]
    assert sorted((s["model"], s["config"]["seed"]) for s in models) == sorted(
        (m, seed) for m in ("ensemble", "ensemble-dydiff", "reward", "diffusion")
        for seed in (0, 1))
    dirs = [plan.policy_job(cfg, "dydiff-td3bc", task, seed)["model_dirs"] for seed in (0, 1)]
    assert dirs[0]["diffusion"].endswith("/models/diffusion/hopper-medium-replay/seed0")
    assert dirs[1]["diffusion"].endswith("/models/diffusion/hopper-medium-replay/seed1")
    assert plan.model_job(cfg, "diffusion", task, 1)["out"] == dirs[1]["diffusion"]
    assert plan.analysis_job(cfg)["config"]["models_shared"] is False

    shared = plan.load_config("tests/configs/tiny.yaml", {
        "seeds": [0, 1], "models": {"shared_across_seeds": True, "seed": 3}})
    models = [s for s in plan.all_jobs(shared) if s["step"] == "train-model"
              and s["task"] == task]
    assert sorted(s["config"]["seed"] for s in models) == [3, 3, 3, 3]
    assert {plan.policy_job(shared, "mopo", task, seed)["model_dirs"]["ensemble"]
            for seed in (0, 1)} == {models[0]["out"].replace(models[0]["model"], "ensemble")}
    assert plan.analysis_job(shared)["config"]["models_shared"] is True


def test_every_output_path_is_under_the_results_folder_and_distinct():
    cfg = plan.load_config(SMOKE)
    patterns = [plan.pattern(cfg, k) for k in plan.PATHS]
    assert len(set(patterns)) == len(patterns)
    assert all(p.startswith("results/smoke/") for p in patterns)
    assert str(plan.path(cfg, "eval", method="mopo", task="hopper-medium", seed=3)) == \
        "results/smoke/policies/mopo/hopper-medium/seed3/eval.json"


def test_cli_names_a_missing_coordinate(capsys):
    from harness.cli import main
    assert main(["train-model", "--configfile", SMOKE, "--task", "hopper-medium-replay"]) == 2
    assert capsys.readouterr().err.strip() == (
        "dydiff-bench train-model: error: train-model needs --model")
    assert main(["train-policy", "--configfile", SMOKE]) == 2
    assert capsys.readouterr().err.strip() == (
        "dydiff-bench train-policy: error: train-policy needs --task and --method")


def test_cli_builds_the_spec_the_dag_runs():
    from harness.cli import _spec, parser
    args = parser().parse_args(["train-policy", "--configfile", SMOKE, "--task",
                                "hopper-medium-replay", "--method", "mopo", "--seed", "1"])
    cfg = plan.load_config(SMOKE)
    assert _spec(args) == plan.with_context(cfg, plan.policy_job(cfg, "mopo",
                                                                 "hopper-medium-replay", 1))


def test_a_variant_inherits_its_parents_settings_and_changes_only_its_own():
    cfg = plan.load_config("config/paper.yaml")
    task = cfg["tasks"][0]
    full = plan.policy_job(cfg, "dydiff-td3bc", task, 0)["config"]["policy"]
    hard = plan.policy_job(cfg, "dydiff-td3bc-hardmax", task, 0)["config"]["policy"]
    assert full["offline"] == hard["offline"] and full["offline"]["rollout_freq"] == 500
    assert {k for k in full["rollout"] if full["rollout"][k] != hard["rollout"][k]} == {"filter"}
    assert hard["rollout"]["filter"] == "hardmax"


def test_ablations_add_the_variants_of_the_dydiff_methods_run():
    cfg = plan.load_config(SMOKE, {"methods": ["td3bc", "dydiff-td3bc"],
                                   "ablations": ["injection", "start"]})
    assert cfg["methods"] == ["td3bc", "dydiff-td3bc", "dydiff-td3bc-k0", "dydiff-td3bc-k1",
                              "dydiff-td3bc-diffusion-start"]
    assert all(registry.method(m).base == "dydiff-td3bc" for m in cfg["methods"][2:])
    with pytest.raises(ConfigError, match=r"ablations\[0\]: 'dropout' is not one of"):
        plan.load_config(SMOKE, {"ablations": ["dropout"]})


def test_paper_config_runs_the_dydiff_authors_protocol():
    """The values of README "Fidelity" (docs/fidelity/dydiff-authors-code.md) in the resolved
    paper config."""
    cfg = plan.load_config("config/paper.yaml")
    task = cfg["tasks"][0]
    for method in ("dydiff-td3bc", "dydiff-cql"):
        p = plan.policy_job(cfg, method, task, 0)["config"]["policy"]
        assert {k: p["rollout"][k] for k in ("init", "iterative_times", "average_states", "clip",
                                             "score", "filter", "threshold", "temp",
                                             "rollout_batch_size", "rollout_length")} == {
            "init": "ensemble", "iterative_times": 2, "average_states": True, "clip": True,
            "score": "all_rows", "filter": "softmax", "threshold": 0.6, "temp": 0.05,
            "rollout_batch_size": 2048, "rollout_length": -1}
        assert {k: p["offline"][k] for k in ("rollout_freq", "model_buffer_size", "real_ratio",
                                             "total_steps")} == {
            "rollout_freq": 500, "model_buffer_size": 2_000_000, "real_ratio": 0.6,
            "total_steps": 1_000_000}
        base = plan.policy_job(cfg, registry.method(method).base, task, 0)["config"]["policy"]
        assert base["agent"] == p["agent"] and base["offline"]["total_steps"] == 1_000_000
    cql = plan.policy_job(cfg, "dydiff-cql", task, 0)["config"]["policy"]["agent"]
    assert {k: cql[k] for k in ("hidden", "cql_weight", "actor_lr", "normalize_obs",
                                "log_alpha_clamp")} == {
        "hidden": [256, 256], "cql_weight": 10.0, "actor_lr": 3e-5, "normalize_obs": True,
        "log_alpha_clamp": [-10.0, 0.5]}
    diffusion = plan.model_job(cfg, "diffusion", task, 0)["config"]["model"]
    assert diffusion["train_steps"] == 375_000 and diffusion["horizon"] == 100
    assert diffusion["sampler"]["num_steps"] == 34 and diffusion["sampler"]["S_churn"] == 60.0
    assert {"ensemble-dydiff", "diffusion", "reward"} <= set(
        plan.policy_job(cfg, "dydiff-td3bc", task, 0)["model_dirs"])


def test_a_narrowed_grid_drops_the_settings_of_what_it_no_longer_runs():
    """`--set tasks=[...] methods=[...]` on the paper grid: its per-task MOPO settings and
    per-method sections of other tasks / methods no longer apply (and are no error)."""
    cfg = plan.load_config("config/paper.yaml", {"tasks": ["hopper-medium"],
                                                 "methods": ["td3bc", "mopo"]})
    assert list(cfg["per_task"]) == ["hopper-medium"]
    assert set(cfg["policy"]["methods"]) == {"mopo"}
    assert set(cfg["per_task"]["hopper-medium"]["policy"]["methods"]) == {"mopo"}
    # A variant keeps its parent's section: the parent is what it derives from.
    cfg = plan.load_config("config/paper.yaml", {"methods": ["td3bc", "dydiff-td3bc-hardmax"]})
    assert set(cfg["policy"]["methods"]) == {"dydiff-td3bc"}


def test_missing_d4rl_datasets_are_all_named_before_any_job(tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    cfg = plan.load_config(SMOKE, {"data": {"source": "d4rl"}, "results_dir": str(tmp_path),
                                   "tasks": ["hopper-medium", "walker2d-medium",
                                             "halfcheetah-random"]})
    with pytest.raises(ConfigError) as err:
        plan.check_datasets(cfg)
    message = str(err.value)
    assert message.startswith("data.source: d4rl: 3 of 3 dataset(s) not found: ")
    for name in ("hopper-medium-v2", "walker2d-medium-v2", "halfcheetah-random-v2"):
        assert f"D4RL dataset '{name}' not found" in message
    # One there, one already imported into results: only the third is missing.
    (tmp_path / "d4rl").mkdir()
    (tmp_path / "d4rl" / "hopper-medium-v2.hdf5").touch()
    imported = plan.path(cfg, "dataset", task="walker2d-medium")
    imported.parent.mkdir(parents=True, exist_ok=True)
    imported.touch()
    with pytest.raises(ConfigError, match=r"1 of 3 dataset\(s\) not found: D4RL dataset "
                                          r"'halfcheetah-random-v2' not found"):
        plan.check_datasets(cfg)
    (tmp_path / "d4rl" / "halfcheetah-random-v2.hdf5").touch()
    plan.check_datasets(cfg)


def test_missing_minari_datasets_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    cfg = plan.load_config(SMOKE, {"data": {"source": "minari"}, "results_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"Minari dataset 'mujoco/hopper/medium-replay-v0' is "
                                          r"not installed locally"):
        plan.check_datasets(cfg)


def test_a_learning_rate_schedule_spans_the_methods_training():
    """OfflineRL-Kit anneals MOPO's actor lr over all of training: the planner fills the
    schedule's length from the method's total_steps, so changing one changes both."""
    task = "hopper-medium"
    for steps in (3_000_000, 20_000):
        cfg = plan.load_config("config/paper.yaml", {"tasks": [task], "methods": ["mopo"],
                                                     "rollout_error": {"enabled": False},
                                                     "policy": {"methods": {"mopo": {
                                                         "offline": {"total_steps": steps}}}}})
        sac = plan.policy_job(cfg, "mopo", task, 0)["config"]["policy"]["agent"]
        assert (sac["actor_lr_schedule"], sac["actor_lr_schedule_steps"]) == ("cosine", steps)


def test_check_config_lists_the_grid_then_names_missing_datasets(tmp_path, monkeypatch, capsys):
    from harness.cli import main
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    assert main(["check-config", "--configfile", "config/paper.yaml",
                 "--set", f"results_dir={tmp_path}"]) == 2
    out = capsys.readouterr()
    assert "import-dataset       15 job(s)" in out.out
    assert out.err.startswith("dydiff-bench check-config: error: config/paper.yaml: data.source: "
                              "d4rl: 15 of 15 dataset(s) not found: ")


def test_an_extends_cycle_is_one_line_naming_the_chain(tmp_path, monkeypatch, capsys):
    from harness.cli import main
    monkeypatch.chdir(tmp_path)  # extends paths are read from where the command runs
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nseeds: [0]\n")
    (tmp_path / "b.yaml").write_text("extends: c.yaml\n")
    (tmp_path / "c.yaml").write_text("extends: b.yaml\n")
    assert main(["check-config", "--configfile", "a.yaml"]) == 2
    err = capsys.readouterr().err
    assert err == ("dydiff-bench check-config: error: a.yaml: extends: the chain loops: "
                   "b.yaml -> c.yaml -> b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    assert main(["check-config", "--configfile", "a.yaml"]) == 2
    assert capsys.readouterr().err.endswith("a.yaml: extends: the chain loops: "
                                            "a.yaml -> b.yaml -> a.yaml\n")
