"""The GPU check's device flow, run on CPU as the GPU machine runs it (scripts/gpu_check.sh run,
with every import the machine's image lacks and the script does not carry blocked), and every
measurement's tensors on the device the measurement names."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from analysis import estimate as E
from analysis import measuring
from harness import plan

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
ALL_ON_GPU = {"devices": {k: "cuda" for k in ("diffusion", "ensemble", "reward", "policy",
                                              "rollout_error")}}
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")

# A sitecustomize for the check's interpreter: an import whose distribution is neither in the
# GPU image's list nor carried by gpu_check.sh fails as it would there.
BLOCKER = '''
import importlib.abc, importlib.metadata, os, re, sys
_norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
_allowed = set(os.environ["GPU_CHECK_ALLOWED"].split())
_project = set(os.environ["GPU_CHECK_PROJECT"].split())
_dists = importlib.metadata.packages_distributions()

class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in _project or top not in _dists:  # the project, the standard library
            return None
        if any(_norm(d) in _allowed for d in _dists[top]):
            return None
        with open(os.environ["GPU_CHECK_BLOCKED"], "a") as f:
            f.write(top + "\\n")
        raise ModuleNotFoundError(f"No module named {top!r} (not on the GPU machine)")

sys.meta_path.insert(0, _Block())
'''


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _allowed_distributions() -> set[str]:
    """The image's distributions and the carried ones, with what they require here (installed
    with them there: pandas' own needs at this venv's version, say), not their extras."""
    from importlib import metadata
    image = " ".join(line for line in (ROOT / "scripts" / "gpu_image_packages.txt")
                     .read_text().splitlines() if not line.startswith("#")).split()
    sh = (ROOT / "scripts" / "gpu_check.sh").read_text()
    carried = re.search(r'PACKAGES="([^"]*)"', sh).group(1).replace("\\", " ").split()
    allowed, todo = set(), [_norm(n) for n in image + carried]
    while todo:
        name = todo.pop()
        if name in allowed:
            continue
        allowed.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [_norm(re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0]) for r in requires
                 if "extra ==" not in r]
    return allowed


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """`bash scripts/gpu_check.sh run --device cpu --quick`, once for the module: 37 s of CPU
    (user + sys) here, ~1 min of wall time on an idle 2-core machine."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    (tmp / "blocker").mkdir()
    (tmp / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    project = [p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()]
    env = {**os.environ, "OUT": str(tmp / "out"), "PYTHON": sys.executable,
           "GPU_WHEELS": str(tmp / "no-wheels"), "GPU_SITE": str(tmp / "site"),
           "PYTHONPATH": f"{tmp / 'blocker'}{os.pathsep}{ROOT}",
           "GPU_CHECK_ALLOWED": " ".join(sorted(_allowed_distributions())),
           "GPU_CHECK_PROJECT": " ".join(project), "GPU_CHECK_BLOCKED": str(tmp / "blocked"),
           "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp),
           # the GPU machine's 360 s is no CPU limit; the test's own timeout guards a hang
           "GPU_CHECK_TIMEOUT": "1200"}
    t0 = time.perf_counter()
    res = subprocess.run(["bash", "scripts/gpu_check.sh", "run", "--device", "cpu", "--quick"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    seconds = time.perf_counter() - t0
    print(f"gpu_check.sh run --device cpu --quick: {seconds:.0f} s, rc {res.returncode}")
    return res, tmp / "out", seconds, tmp


def test_dry_run_exits_0_with_every_item_in_one_results_file(dry_run):
    res, out, seconds, tmp = dry_run
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    items = [r["item"] for r in rows]
    # Most valuable first: the main GPU rows, then determinism, levers, the rest, the estimate.
    order = ["environment", "throughput", "models_identical_deterministic",
             "policy_identical_deterministic", "policy_resumed_equals_uninterrupted",
             "diffusion_identical_without_deterministic", "levers", "estimate", "summary"]
    assert [i for i in dict.fromkeys(items) if i in order] == order, items
    checks = [r for r in rows if "ok" in r and r["item"] not in ("levers", "summary")]
    assert checks and all(r["ok"] is True for r in checks), checks
    assert rows[-1] == {**rows[-1], "item": "summary", "ok": True, "failed": []}
    # The models trained are the registry entry's, DyDiff's start-state ensemble included.
    models = next(r for r in rows if r["item"] == "models_identical_deterministic")["models"]
    from harness import registry
    assert sorted(models) == sorted(registry.method("dydiff-td3bc").models)
    levers = next(r for r in rows if r["item"] == "levers")
    if not (ROOT / "scripts" / "gpu_levers.py").exists():
        assert levers["status"] == "levers: not present in this tree" and levers["ok"] is None
    env_row = rows[0]
    assert {"torch", "cuda", "driver", "gpu"} <= set(env_row)


def test_dry_run_times_the_paper_dydiff_rollout_path(dry_run):
    res, out, _, _ = dry_run
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    main = [r["row"] for r in rows if r["item"] == "throughput" and r["group"] == "main"]
    assert {r["item"] for r in main} == {"rollout", "diffusion-train"}
    rollout = json.loads(next(r for r in main if r["item"] == "rollout")["settings"])
    paper = plan.load_config(ROOT / "config" / "paper.yaml")
    job = plan.model_job(paper, "diffusion", "walker2d-medium", 0)["config"]["model"]
    unet = {k: job[k] for k in ("dim", "dim_mults", "horizon", "kernel_size")}
    assert {k: rollout["models"]["diffusion"][k] for k in unet} == unet  # the paper U-Net
    assert rollout["rollout"]["rollout_batch_size"] == 1  # --quick: reduced size
    assert rollout["models"]["diffusion"]["sampler"]["num_steps"] == 2
    assert all(r["dry_run"] for r in rows if r["item"] == "throughput")
    measured = {r["row"]["item"] for r in rows if r["item"] == "throughput"}
    assert measured == {"rollout", "diffusion-train", "agent-update", "ensemble-train",
                        "reward-train"}  # --quick: every kind's path, no budget cut
    assert not [r for r in rows if r["item"].endswith("-not-measured")]


def test_dry_run_files_fit_what_the_gpu_machine_returns(dry_run):
    res, out, seconds, tmp = dry_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8, files
    assert all(len(p.relative_to(out).parts) <= 3 and SAFE_NAME.match(p.name) for p in files)
    assert {p.name for p in files} >= {"results.jsonl", "estimate.md", "gpu_check.log",
                                       "nvidia-smi.txt", "pytest.txt"}
    assert not [p for p in tmp.glob("gpu-check-*")], "work folder left behind"
    blocked = (tmp / "blocked").read_text().split() if (tmp / "blocked").exists() else []
    print(f"imports blocked (optional ones the check does without): {sorted(set(blocked))}")


def test_a_failed_check_fails_the_exit_code(tmp_path, monkeypatch):
    """Every check counts (a model not reproduced among them), and a crashing item is a
    failure with its traceback while the items after it still run."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_check
    results = gpu_check.Results(tmp_path / "results.jsonl")
    results.append({"item": "models_identical_deterministic", "ok": False,
                    "models": {"diffusion": False, "reward": True}})
    gpu_check.run_item(results, "boom", lambda: 1 / 0)
    gpu_check.run_item(results, "after", lambda: results.append({"item": "after"}))
    rows = results.rows()
    assert gpu_check.failures(rows) == ["models_identical_deterministic", "boom"]
    assert "ZeroDivisionError" in rows[1]["traceback"] and rows[2]["item"] == "after"


# ---- every measurement on the device it names ------------------------------------------------

_TRANSFERS = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}
SMALL = 64  # elements: a host-side schedule or scalar, not a batch of work


class _OnMeta(TorchDispatchMode):
    """Inside a measurement labelled `meta`: every op's tensors must be on meta, except copies
    onto it and small host-side values. Host reads of meta tensors answer a stand-in (true,
    zeros; 1 for a number: Adam divides by its step count) so the measurement runs to its end."""

    def __init__(self):
        super().__init__()
        self.elsewhere: list[str] = []
        self.on_meta = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs))
                   if isinstance(t, torch.Tensor)]
        if func is torch.ops.aten._local_scalar_dense.default:
            return True if tensors[0].dtype == torch.bool else 1
        if (func is torch.ops.aten._to_copy.default and tensors[0].is_meta
                and str(kwargs.get("device")) == "cpu"):
            return torch.zeros(tensors[0].shape, dtype=kwargs.get("dtype") or tensors[0].dtype)
        if func not in _TRANSFERS:
            off = [t for t in tensors if not t.is_meta and t.numel() > SMALL]
            self.elsewhere += [f"{func}: {t.device} {tuple(t.shape)}" for t in off]
            self.on_meta += any(t.is_meta for t in tensors)
        return func(*args, **kwargs)


def _first_items() -> dict:
    cfg = plan.load_config(TINY, ALL_ON_GPU)
    firsts = {}
    for (name, _), it in E.missing_items(E.plan_costs(cfg, []), gpu=True).items():
        if name in measuring.MEASURES and name not in E.CPU_ITEMS:
            kind = name + ("-dydiff" if "diffusion" in E._settings(it).get("models", {})
                           else "")
            firsts.setdefault(kind, it)
    return firsts


@pytest.fixture
def meta_measuring(monkeypatch):
    """measuring.measure on the meta device, each timed call under _OnMeta. Meta lacks a fused
    Adam check, torch.Generator and a data-dependent nonzero: the first two are let through,
    nonzero assumes all rows kept."""
    import torch.fx.experimental._config as fx_config
    import torch.optim.adam as adam
    monkeypatch.setattr(adam, "_device_dtype_check_for_fused", lambda *a, **k: None)
    real_generator = torch.Generator

    class Generator(real_generator):
        def __new__(cls, device="cpu"):
            return real_generator("cpu" if str(device) == "meta" else device)
    monkeypatch.setattr(torch, "Generator", Generator)
    modes: list[_OnMeta] = []
    timed = measuring._timed

    def checked(fn, *args, **kwargs):
        mode = _OnMeta()
        modes.append(mode)

        def inside():
            with mode:
                fn()
        return timed(inside, *args, **kwargs)
    monkeypatch.setattr(measuring, "_timed", checked)
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        yield modes


@pytest.mark.parametrize("kind", ["agent-update", "diffusion-train", "ensemble-train",
                                  "reward-train", "rollout", "rollout-dydiff"])
def test_every_measurement_runs_on_the_device_it_names(kind, meta_measuring):
    it = _first_items()[kind]
    measuring.measure(it, "meta")
    assert meta_measuring and all(m.on_meta > 0 for m in meta_measuring)
    elsewhere = sorted({e for m in meta_measuring for e in m.elsewhere})
    assert not elsewhere, f"{kind}: tensors off the measuring device:\n  " + "\n  ".join(
        elsewhere[:20])


def test_the_device_check_catches_a_network_left_on_the_cpu(meta_measuring, monkeypatch):
    """The defect the check was written for: a diffusion step timed with its network, EMA and
    segments on the CPU under a device label."""
    monkeypatch.setattr(measuring, "_on", lambda x: x)
    monkeypatch.setattr(measuring, "_measure_device", "cpu")
    it = _first_items()["diffusion-train"]
    fn, _ = measuring.MEASURES[it.name]
    fn(E._settings(it))
    assert any(m.elsewhere for m in meta_measuring)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_no_usable_gpu_is_the_result_not_a_traceback(tmp_path):
    """A GPU machine whose torch cannot use its GPU (an old driver, say) still returns what it
    found: the device's one line, the environment, and exit code 1."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_check
    assert gpu_check.main(["--out", str(tmp_path), "--device", "cuda"]) == 1
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["item"] for r in rows] == ["device", "environment", "summary"]
    assert "this job was given 'cuda'" in rows[0]["error"] and rows[1]["torch"] == torch.__version__
    assert rows[2]["failed"] == ["device"]
