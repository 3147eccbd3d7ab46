"""Provenance: config/paper.yaml, resolved through the planner, runs the published baselines
with the settings of the sources their columns come from (baselines/reference_settings.yaml)."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import yaml

from harness import plan, registry

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "baselines" / "reference_settings.yaml"
PAPER = "config/paper.yaml"


def reference() -> dict:
    return yaml.safe_load(REFERENCE.read_text())


def expected(ref: dict, method: str, task: str) -> dict[str, dict]:
    """key -> {value, source} that `method` must resolve to on `task`."""
    spec = ref["methods"][method]
    out = dict(spec.get("all_tasks") or {})
    section = ref[spec.get("preset_section", "mopo_presets")]
    prefix = spec.get("per_task_prefix", "rollout")
    for preset in spec.get("per_task_presets") or []:
        entry = section[preset].get(task)
        if entry is not None:
            out.update({f"{prefix}.{k}": {"value": entry[k], "source": entry["source"]}
                        for k in spec["per_task_keys"]})
            break
    else:
        assert not spec.get("per_task_presets"), f"{method}: no preset lists {task}"
    out.update((spec.get("per_task") or {}).get(task) or {})
    return out


def drift(cfg: dict, ref: dict) -> list[str]:
    """One line per setting whose resolved value differs from the reference's."""
    problems = []
    for method in ref["methods"]:
        for task in cfg["tasks"]:
            resolved = {**plan.policy_job(cfg, method, task, 0)["config"]["policy"],
                        "evaluation": {"final_episodes": plan.eval_job(
                            cfg, method, task, 0)["config"]["episodes"]}}
            for key, want in expected(ref, method, task).items():
                section, _, name = key.partition(".")
                found = resolved[section].get(name, "<missing>")
                if found != want["value"]:
                    problems.append(f"{method} / {task}: {key} expected {want['value']!r} "
                                    f"(source: {want['source']}), found {found!r}")
    return problems


def test_every_reference_value_names_its_source_file():
    ref = reference()
    repos = set(ref["commits"])
    entries = [e for p in ref["mopo_presets"].values() for e in p.values()]
    entries += [e for p in ref["diffql_presets"].values() for e in p.values()]
    entries += [e for m in ref["models"].values() for e in m.values()]
    for spec in ref["methods"].values():
        entries += list((spec.get("all_tasks") or {}).values())
        entries += [e for t in (spec.get("per_task") or {}).values() for e in t.values()]
    assert entries
    for entry in entries:
        repo = "/".join(entry["source"].split("/")[:2])
        assert repo in repos and ":" in entry["source"], entry


def test_paper_config_runs_the_reference_settings():
    cfg = plan.load_config(PAPER)
    ref = reference()
    # the baselines with a reference here that the paper grid runs
    assert {"mopo", "mbpo", "cql-corl", "diffql", "dydiff-diffql", "dydiff-diffql-hardmax",
            "diffql-wang"} <= set(cfg["methods"])
    problems = drift(cfg, ref)
    assert not problems, "\n".join(problems)


def test_a_drifted_value_is_named_with_method_task_key_and_source():
    ref = reference()
    cfg = plan.load_config(PAPER, {"per_task": {"hopper-medium-replay": {"policy": {"methods": {
        "mopo": {"rollout": {"penalty_coef": 1.0}}}}}}})
    assert drift(cfg, ref) == [
        "mopo / hopper-medium-replay: rollout.penalty_coef expected 2.5 (source: "
        "yihaosun1124/OfflineRL-Kit/run_example/run_mopo.py:32), found 1.0"]
    cfg = plan.load_config(PAPER, {"policy": {"sac": {"alpha_max": None}}})
    problems = drift(cfg, ref)
    assert len(problems) == 2 * len(cfg["tasks"])  # MOPO and MBPO, every task
    assert problems[0] == ("mopo / hopper-random: agent.alpha_max expected 1.0 (source: "
                           "yihaosun1124/OfflineRL-Kit/offlinerlkit/policy/model_free/sac.py:126),"
                           " found None")


def test_maze2d_drift_is_named_too():
    """The maze2d settings are checked like the MuJoCo ones: CORL's Lagrange CQL and its
    evaluation episodes, during training and at the end."""
    ref = reference()
    cfg = plan.load_config(PAPER, {"per_task": {"maze2d-umaze": {"policy": {"methods": {
        "cql-corl": {"cql": {"lagrange_threshold": 5.0}}}}}}})
    assert drift(cfg, ref) == [
        "cql-corl / maze2d-umaze: agent.lagrange_threshold expected 50.0 (source: "
        "tinkoff-ai/CORL/configs/offline/cql/maze2d/umaze_v1.yaml:12,14 (cql_alpha x "
        "cql_target_action_gap); tinkoff-ai/CORL/algorithms/offline/cql.py:681-693), found 5.0"]
    cfg = plan.load_config(PAPER, {"per_task": {"maze2d-large": {
        "evaluation": {"final_episodes": 10}}}})
    assert drift(cfg, ref) == [
        f"{m} / maze2d-large: evaluation.final_episodes expected 100 (source: tinkoff-ai/CORL/"
        f"configs/offline/{algo}/maze2d/large_v1.yaml:{line}), found 10"
        for m, algo, line in (("td3bc", "td3_bc", 13), ("cql-corl", "cql", 23))]


def test_maze2d_evaluates_every_method_on_corls_100_episodes():
    """Evaluation is part of the task, not of a method: every method of the grid, MOPO /
    MBPO / DyDiff included, scores maze2d on 100 episodes (CORL's n_episodes) and MuJoCo on
    10."""
    cfg = plan.load_config(PAPER)
    for task in cfg["tasks"]:
        want = 100 if task.startswith("maze2d-") else 10
        for method in cfg["methods"]:
            offline = plan.policy_job(cfg, method, task, 0)["config"]["policy"]["offline"]
            final = plan.eval_job(cfg, method, task, 0)["config"]["episodes"]
            assert (offline["eval_episodes"], final) == (want, want), (method, task)


def test_maze2d_mopo_setting_is_a_named_choice_and_what_it_says():
    """No source lists MOPO's h / lambda for maze2d: the preset says so, and its claim (the
    MOPO authors' most common setting, MOPOConfig's defaults) is recounted here."""
    from collections import Counter
    from baselines.mopo import MOPOConfig, PRESETS
    ref = reference()
    maze = ref["mopo_presets"]["maze2d-choice"]
    tasks = [t for t in plan.load_config(PAPER)["tasks"] if t.startswith("maze2d-")]
    assert sorted(maze) == sorted(tasks) == ["maze2d-large", "maze2d-medium", "maze2d-umaze"]
    assert all("no source lists maze2d" in e["choice"] for e in maze.values())
    assert not any(t.startswith("maze2d") for p in ("offlinerl-kit", "mopo-authors")
                   for t in PRESETS[p])
    authors = [(e["rollout_length"], e["penalty_coef"]) for e in PRESETS["mopo-authors"].values()]
    (mode, n), = Counter(authors).most_common(1)
    assert (mode, n) == ((5, 1.0), 4)
    assert sum(h == 5 for h, _ in authors) == 8 and sum(lam == 1.0 for _, lam in authors) == 7
    default = MOPOConfig()
    for entry in maze.values():
        assert (entry["rollout_length"], entry["penalty_coef"]) == mode == \
            (default.rollout_length, default.penalty_coef)


def test_random_datasets_keep_the_mopo_authors_values():
    from baselines.mopo import GRID_PRESETS, PRESETS, grid_settings
    ref = reference()
    assert GRID_PRESETS == tuple(ref["methods"]["mopo"]["per_task_presets"])
    for task in plan.load_config(PAPER)["tasks"]:
        preset, values = grid_settings(task)
        assert preset == ("maze2d-choice" if task.startswith("maze2d-") else
                          "mopo-authors" if task.endswith("-random") else "offlinerl-kit")
        assert values == PRESETS[preset][task]


def test_cql_presets_are_complete_so_the_shared_section_cannot_leak_in():
    """A preset sets every CQLConfig field: the config's policy.cql (the DyDiff authors'
    settings in paper.yaml) changes nothing in cql-corl / cql-offlinerl-kit."""
    from agents.cql import CQLConfig
    fields = {f.name for f in dataclasses.fields(CQLConfig)}
    for name, preset in registry.CQL_PRESETS.items():
        assert set(preset) == fields, name
    cfg = plan.load_config(PAPER)
    task = "walker2d-medium"
    other = plan.load_config(PAPER, {"policy": {"cql": {"cql_weight": 1.0, "hidden": [8]}}})
    for method in ("cql-corl", "cql-offlinerl-kit"):
        assert plan.policy_job(cfg, method, task, 0)["config"]["policy"]["agent"] == \
            plan.policy_job(other, method, task, 0)["config"]["policy"]["agent"]


def test_the_cql_pair_shares_its_settings_and_columns_say_whose_they_are():
    cfg = plan.load_config(PAPER)
    for task in cfg["tasks"]:
        for base in ("cql", "td3bc", "diffql"):  # equal budgets: pairs differ only in rollouts
            pair = [plan.policy_job(cfg, m, task, 0)["config"]["policy"]
                    for m in (base, f"dydiff-{base}")]
            assert pair[0]["agent"] == pair[1]["agent"], (base, task)
            assert pair[0]["offline"]["total_steps"] == pair[1]["offline"]["total_steps"]
    # published CQL numbers sit only next to the preset that reproduces their settings
    published = {m.name: m.published for m in registry.METHODS.values() if m.agent == "cql"
                 and m.published}
    assert published == {"dydiff-cql": ("dydiff-paper",),
                         "cql-corl": ("corl",),
                         "cql-offlinerl-kit": ("offlinerl-kit",)}
    assert registry.method("cql-corl").label == "CQL, CORL settings"
    assert "settings" in registry.method("cql").label


@pytest.mark.parametrize("bad", [{"rollout_length": 5, "source": "x/y/z.py:1"}])
def test_a_malformed_preset_names_the_file_and_key(tmp_path, bad):
    from baselines.mopo import load_presets
    path = tmp_path / "reference_settings.yaml"
    path.write_text(yaml.safe_dump({"mopo_presets": {"offlinerl-kit": {"hopper-medium": bad}}}))
    with pytest.raises(ValueError, match=r"mopo_presets\.offlinerl-kit\.hopper-medium: missing "
                                         r"\['penalty_coef'\]"):
        load_presets(path)


def test_paper_config_trains_the_reference_ensemble():
    """MOPO / MBPO's dynamics ensemble, for every task and model seed of the paper grid,
    bootstrap member sampling included; DyDiff's diffusion and reward models as its authors'."""
    cfg = plan.load_config(PAPER)
    problems = []
    for spec in plan.all_jobs(cfg):
        if spec["step"] != "train-model" or spec["model"] not in reference()["models"]:
            continue
        for key, want in reference()["models"][spec["model"]].items():
            found = spec["config"]["model"]
            for part in key.split("."):  # dotted: a nested setting (sampler.dtype)
                found = found.get(part, "<missing>") if isinstance(found, dict) else "<missing>"
            if found != want["value"]:
                problems.append(f"models.{spec['model']} / {spec['task']}: {key} expected "
                                f"{want['value']!r} (source: {want['source']}), found {found!r}")
    assert not problems, "\n".join(sorted(set(problems)))


def test_diffql_presets_are_complete_and_paper_yaml_runs_the_authors_for_the_pair():
    """DIFFQL_PRESETS set every DiffQLConfig field (policy.diffql cannot leak into diffql-wang);
    paper.yaml's policy.diffql, shared by diffql and dydiff-diffql, is the DyDiff authors'."""
    from agents.diffql import DiffQLConfig
    fields = {f.name for f in dataclasses.fields(DiffQLConfig)}
    for name, preset in registry.DIFFQL_PRESETS.items():
        assert set(preset) == fields, name
    cfg = plan.load_config(PAPER)
    other = plan.load_config(PAPER, {"policy": {"diffql": {"eta": 9.0, "critic_hidden": [8]}}})
    for task in ("walker2d-medium", "maze2d-large"):
        assert plan.policy_job(cfg, "diffql-wang", task, 0)["config"]["policy"]["agent"] == \
            plan.policy_job(other, "diffql-wang", task, 0)["config"]["policy"]["agent"]
        for method in ("diffql", "dydiff-diffql", "dydiff-diffql-hardmax"):
            agent = plan.policy_job(cfg, method, task, 0)["config"]["policy"]["agent"]
            assert agent == registry.DIFFQL_PRESETS["dydiff-authors"], (method, task)
    assert registry.method("dydiff-diffql").base == "diffql"
    assert registry.method("diffql-wang").compare is False
    names = set(registry.METHODS)
    assert {f"dydiff-diffql-{s}" for s in ("hardmax", "nofilter", "k0", "k1", "diffusion-start",
                                           "noclip", "alive-score", "fastsampler")} <= names


def test_diffql_choice_is_what_it_says_and_wang_rows_are_main_pys():
    """No random / maze2d row in main.py: the choice is the MuJoCo rows' common values and the
    median grad-norm, recounted here; every grid task resolves to exactly one row."""
    ref = reference()
    wang, choice = ref["diffql_presets"]["wang"], ref["diffql_presets"]["diffql-choice"]
    mujoco = [e for t, e in wang.items() if not t.startswith("antmaze")]
    assert len(mujoco) == 9
    for key in ("actor_lr", "eta", "max_q_backup", "reward_tune"):
        (value,) = {e[key] for e in mujoco}
        assert all(e[key] == value for e in choice.values()), key
    assert all(e["grad_norm"] == float(np.median([m["grad_norm"] for m in mujoco]))
               for e in choice.values())
    assert all("no row in main.py" in e["choice"] for e in choice.values())
    tasks = plan.load_config(PAPER)["tasks"]
    assert all((t in wang) != (t in choice) for t in tasks)
    assert sorted(t for t in tasks if t in choice) == sorted(choice)
    # the antmaze rows set max_q_backup and cql_antmaze reward tuning (main.py:27-32)
    ant = [e for t, e in wang.items() if t.startswith("antmaze")]
    assert len(ant) == 6 and {e["reward_tune"] for e in ant} == {"cql_antmaze"}
    assert [e["max_q_backup"] for e in ant] == [False, True, True, True, True, True]


def test_diffql_smoke_runs_the_authors_diffql_with_equal_budgets():
    """config/diffql-smoke.yaml: the DiffQL pair with the DyDiff authors' agent (both members)
    and the same number of updates, as the paper grid."""
    cfg = plan.load_config(ROOT / "config" / "diffql-smoke.yaml")
    jobs = {m: plan.policy_job(cfg, m, cfg["tasks"][0], 0)["config"]["policy"]
            for m in ("diffql", "dydiff-diffql")}
    for method, policy in jobs.items():
        assert policy["agent"] == registry.DIFFQL_PRESETS["dydiff-authors"], method
    assert jobs["diffql"]["offline"]["total_steps"] == jobs["dydiff-diffql"]["offline"][
        "total_steps"]
    assert jobs["dydiff-diffql"]["offline"]["rollout_freq"] == 250


VARIANTS = ROOT / "config" / "diffql-variants.yaml"


def test_the_pairs_grad_norm_is_a_documented_choice_and_wangs_table_a_variant():
    """paper.yaml's grad-norm 5 on every task is the DyDiff authors' hopper-medium-expert spec,
    stated as a choice (= Wang's hopper-medium-expert row); `diffql-gn-wang` is the pair's
    DiffQL with Wang's per-task value instead, on every task, in any grid that runs it."""
    ref = reference()
    wang, choice = ref["diffql_presets"]["wang"], ref["diffql_presets"]["diffql-choice"]
    authors = ref["methods"]["diffql"]["all_tasks"]["agent.grad_norm"]
    assert authors["value"] == wang["hopper-medium-expert"]["grad_norm"] == 5.0
    assert "diffql-gn-wang" in authors["choice"] and "main.py:25" in authors["choice"]
    want = {t: e["grad_norm"] for t, e in {**wang, **choice}.items()
            if not t.startswith("antmaze")}
    assert registry.WANG_GRAD_NORM == want
    assert sorted(set(want.values())) == [1.0, 2.0, 4.0, 5.0, 7.0, 9.0]
    paper = plan.load_config(PAPER)
    variants = plan.load_config(VARIANTS)
    assert variants["tasks"] == paper["tasks"]
    for cfg in (paper, variants):  # the paper grid does not run it: resolved all the same
        for task in cfg["tasks"]:
            base, gn = (plan.policy_job(cfg, m, task, 0)["config"]["policy"]
                        for m in ("diffql", "diffql-gn-wang"))
            assert gn["agent"] == {**base["agent"], "grad_norm": want[task]}, task
            assert base["agent"]["grad_norm"] == 5.0 and gn["offline"] == base["offline"]
    for task in paper["tasks"]:  # the same table as the original's per-task lines
        original = plan.policy_job(paper, "diffql-wang", task, 0)["config"]["policy"]["agent"]
        assert original["grad_norm"] == want[task], task
    # the config's own per_task setting still wins over the variant's table
    mine = plan.load_config(VARIANTS, {"per_task": {"hopper-medium": {"policy": {"methods": {
        "diffql-gn-wang": {"diffql": {"grad_norm": 3.0}}}}}}})
    assert [plan.policy_job(mine, "diffql-gn-wang", t, 0)["config"]["policy"]["agent"][
        "grad_norm"] for t in ("hopper-medium", "walker2d-medium")] == [3.0, 1.0]
    assert ("diffql-gn-wang", "diffql") in registry.comparisons()


def test_the_authors_diffql_budget_is_a_variant_and_the_pair_keeps_equal_budgets():
    """`diffql-authors-1m` trains the authors' 2000 x 500 = 1M updates (their DiffQL spec), an
    otherwise identical `diffql`; diffql and dydiff-diffql keep the same 500k."""
    ref = reference()
    budget = ref["methods"]["diffql-authors-1m"]["all_tasks"]["offline.total_steps"]
    assert budget["value"] == 1_000_000 and "diffql_hopper_me.yaml:18-19" in budget["source"]
    paper = plan.load_config(PAPER)
    for task in paper["tasks"]:
        base, pair = (plan.policy_job(paper, m, task, 0)["config"]["policy"]["offline"]
                      for m in ("diffql", "dydiff-diffql"))
        assert base["total_steps"] == pair["total_steps"] == 500_000, task
    for cfg in (paper, plan.load_config(VARIANTS)):
        for task in cfg["tasks"]:
            base, long = (plan.policy_job(cfg, m, task, 0)["config"]["policy"]
                          for m in ("diffql", "diffql-authors-1m"))
            assert base["offline"]["total_steps"] == 500_000
            assert long["offline"] == {**base["offline"], "total_steps": 1_000_000}, task
            assert long["agent"] == base["agent"]
    assert ("diffql-authors-1m", "diffql") in registry.comparisons()
    assert plan.load_config(VARIANTS)["methods"] == ["diffql", "diffql-gn-wang",
                                                     "diffql-authors-1m"]
