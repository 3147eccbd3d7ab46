"""The layout keeps its promises: layers import downward only, every registry name resolves, a
method added in one place reaches every part of the harness, provenance is real."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dag_helpers import BIN, ROOT, TINY, env_with_bin, snakemake, tail
from harness import registry

# Lower layers never import higher ones; packages on one layer do not import each other.
LAYERS = {"harness": 0, "agents": 1, "datagen": 2, "baselines": 2, "dydiff": 2, "analysis": 3}


def _imports(path: Path) -> set[str]:
    """Top-level project packages a module imports (at module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(LAYERS)


def test_no_module_imports_a_higher_layer_or_a_sibling_package():
    wrong = []
    for package, level in LAYERS.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for imported in _imports(path) - {package}:
                if LAYERS[imported] >= level:
                    wrong.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert not wrong, wrong


def test_every_registry_reference_resolves():
    refs = [ref for a in registry.AGENTS.values() for ref in (a.cls, a.config)]
    refs += [ref for m in registry.MODELS.values() for ref in (m.config, m.train, m.load)]
    refs += [ref for m in registry.METHODS.values() for ref in (m.generator, m.rollout_config)
             if ref]
    refs += list(registry.STEPS.values())
    for ref in refs:
        assert callable(registry.resolve(ref)), ref
    with pytest.raises(ImportError, match="cannot import 'harness.nowhere:x'"):
        registry.resolve("harness.nowhere:x")


def test_published_sources_named_by_the_registry_exist():
    from analysis.tables import load_published
    keys = {p.key: p for p in load_published()}
    for method in registry.METHODS.values():
        for source in method.published:
            assert source in keys and method.name in keys[source].scores, (method.name, source)


def test_git_sha_is_the_commit_not_the_fallback():
    from harness.runtime import git_sha
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", git_sha())


def test_checkpoint_api_is_used_by_no_module_that_hand_rolls_torch_save():
    """One checkpoint helper: no trainer calls torch.save / torch.load itself."""
    offenders = []
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "harness" / "checkpoint.py":
                continue
            text = path.read_text()
            if re.search(r"torch\.(save|load)\(", text):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders


# ---- a method registered in one place --------------------------------------------------------

PLUGIN = "dydiff_bench_test_plugin"
DUMMY = "td3bc-dummy"


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A module of one `variant_of` call: the whole of adding the method."""
    (tmp_path / f"{PLUGIN}.py").write_text(textwrap.dedent(f"""
        from harness.registry import variant_of
        variant_of("td3bc", "{DUMMY}", "TD3+BC dummy", "#17becf",
                   overrides={{"td3bc": {{"alpha": 1.0}}}}, source="a test of the registry")
    """))
    env = {"DYDIFF_BENCH_PLUGINS": PLUGIN,
           "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    monkeypatch.syspath_prepend(str(tmp_path))
    __import__(PLUGIN)
    yield env
    registry.METHODS.pop(DUMMY, None)
    sys.modules.pop(PLUGIN, None)


def test_a_registered_method_reaches_check_config_and_the_dag(plugin, tmp_path):
    out = subprocess.run([str(BIN / "dydiff-bench"), "check-config", "--configfile", str(TINY),
                          "--set", f"methods=[td3bc,{DUMMY}]"], cwd=ROOT,
                         env=env_with_bin(plugin), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"methods: td3bc, {DUMMY}" in out.stdout
    res = snakemake("-n", "--cores", "1", "--configfile", str(TINY), "--config",
                    f"methods=[td3bc,{DUMMY}]", f"results_dir={tmp_path}", env=plugin)
    assert res.returncode == 0, tail(res)
    assert f"policies/{DUMMY}/" in res.stdout
    # Its settings are its base's plus its overrides.
    from harness import plan
    cfg = plan.load_config(TINY, {"methods": ["td3bc", DUMMY]})
    task = cfg["tasks"][0]
    base = plan.policy_job(cfg, "td3bc", task, 0)["config"]["policy"]
    mine = plan.policy_job(cfg, DUMMY, task, 0)["config"]["policy"]
    assert mine["agent"] == {**base["agent"], "alpha": 1.0} and base["agent"]["alpha"] != 1.0


def test_a_registered_method_reaches_aggregates_tables_and_figures(plugin, tmp_path):
    from analysis.aggregate import run_aggregate
    from analysis.tables import run_tables
    for method, score in (("td3bc", 50.0), (DUMMY, 60.0)):
        for task in ("hopper-medium", "walker2d-medium"):
            for seed in range(2):
                d = tmp_path / "runs" / method / task / f"seed{seed}"
                d.mkdir(parents=True)
                (d / "eval.json").write_text(json.dumps(
                    {"method": method, "task": task, "seed": seed,
                     "normalized_score": score + seed}))
    out = run_aggregate([tmp_path / "runs"], tmp_path / "agg", reps=100, seed=0)
    assert DUMMY in set(out["aggregates"].method)
    assert out["improvement"][["x", "y"]].values.tolist() == [[DUMMY, "td3bc"]]
    tables = run_tables([tmp_path / "runs"], tmp_path / "tables")
    assert "TD3+BC dummy (ours)" in tables["td3bc"]["markdown"]
    assert "TD3+BC dummy (ours)" in tables["overall"]["markdown"]
