"""Config validation at the edge: wrong keys/values fail before any job, naming the key."""
import pytest

from dydiff import jobs
from dydiff.cli import _overrides
from dydiff.config import ConfigError, from_dict
from dydiff.rl.offline_loop import OfflineConfig

SMOKE = "config/smoke.yaml"


def test_smoke_and_paper_configs_are_valid():
    for path in (SMOKE, "config/paper.yaml"):
        cfg = jobs.load_config(path)
        assert jobs.all_jobs(cfg)


@pytest.mark.parametrize("override, message", [
    ({"methods": ["td3bc", "dreamer"]}, "unknown method(s) ['dreamer']"),
    ({"tasks": ["ant-medium"]}, "unknown task 'ant-medium'"),
    ({"tasks": ["hopper-mediocre"]}, "unknown dataset kind 'mediocre'"),
    ({"seeds": [-1]}, "seeds"),
    ({"learning_rate": 3}, "unknown top-level key(s) ['learning_rate']"),
    ({"policy": {"offline": {"total_step": 5}}}, "policy[td3bc].offline: unknown key(s) "
                                                  "['total_step']"),
    ({"policy": {"offline": {"real_ratio": 1.5}}}, "policy[td3bc].offline.real_ratio"),
    ({"policy": {"td3bc": {"alpha": "big"}}}, "policy[td3bc].td3bc.alpha: expected a number"),
    ({"per_task": {"walker2d-medium": {}}}, "per_task"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        jobs.load_config(SMOKE, override)
    assert message in str(err.value)


def test_negative_rollout_horizon_is_rejected_before_training():
    with pytest.raises(ConfigError) as err:
        jobs.load_config(SMOKE, {"policy": {"methods": {"mopo": {"rollout": {
            "rollout_length": -1}}}}})
    assert "policy.methods.mopo.rollout.rollout_length" in str(err.value)


def test_from_dict_types_and_unknown_keys():
    cfg = from_dict(OfflineConfig, {"total_steps": 10, "real_ratio": 1}, where="offline")
    assert cfg.total_steps == 10 and cfg.real_ratio == 1.0
    with pytest.raises(ConfigError, match=r"offline.total_steps: expected an integer"):
        from_dict(OfflineConfig, {"total_steps": 1.5}, where="offline")
    with pytest.raises(ConfigError, match=r"offline: unknown key\(s\) \['steps'\]"):
        from_dict(OfflineConfig, {"steps": 1}, where="offline")


def test_per_task_overrides_reach_only_that_task():
    cfg = jobs.load_config(SMOKE)
    task, other = cfg["tasks"][:2]
    cfg["per_task"] = {task: {"policy": {"offline": {"batch_size": 7}}}}
    a = jobs.policy_job(cfg, "td3bc", task, 0)["config"]["policy"]["offline"]["batch_size"]
    b = jobs.policy_job(cfg, "td3bc", other, 0)["config"]["policy"]["offline"]["batch_size"]
    assert a == 7 and b != 7


def test_changing_one_method_changes_only_its_job_specs():
    cfg = jobs.load_config(SMOKE)
    before = {(s["step"], s.get("method"), s.get("task"), s.get("seed")): s
              for s in jobs.all_jobs(cfg)}
    cfg["policy"].setdefault("methods", {}).setdefault("cql", {}).setdefault("cql", {})[
        "cql_weight"] = 1.0
    after = {(s["step"], s.get("method"), s.get("task"), s.get("seed")): s
             for s in jobs.all_jobs(cfg)}
    changed = {k for k in before if before[k] != after[k]}
    assert changed and all(k[0] == "train-policy" and k[1] == "cql" for k in changed)


def test_cli_overrides_parse_yaml_values():
    assert _overrides(["seeds=[0,1,2]", "policy.offline.total_steps=500"]) == {
        "seeds": [0, 1, 2], "policy": {"offline": {"total_steps": 500}}}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        _overrides(["seeds"])


def test_paper_config_uses_mopo_published_settings_per_task():
    from baselines.mopo import PAPER_SETTINGS
    cfg = jobs.load_config("config/paper.yaml")
    for task in cfg["tasks"]:
        mopo = jobs.policy_job(cfg, "mopo", task, 0)["config"]["policy"]["rollout"]
        mbpo = jobs.policy_job(cfg, "mbpo", task, 0)["config"]["policy"]["rollout"]
        assert {k: mopo[k] for k in PAPER_SETTINGS[task]} == PAPER_SETTINGS[task], task
        assert mbpo["rollout_length"] == PAPER_SETTINGS[task]["rollout_length"]
        assert (mbpo["penalty"], mbpo["penalty_coef"]) == ("none", 0.0)


def test_mbpo_rejects_a_penalty():
    with pytest.raises(ConfigError, match="policy.methods.mbpo.rollout.*penalty_coef"):
        jobs.load_config(SMOKE, {"policy": {"methods": {"mbpo": {"rollout": {
            "penalty_coef": 2.0}}}}})
