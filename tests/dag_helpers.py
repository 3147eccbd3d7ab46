"""Helpers shared by the DAG tests (test_workflow.py, test_slurm.py): run Snakemake from this
environment, read a training job's outputs, compare two runs of the same job."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
# A longer td3bc job for the resume tests: long enough to be interrupted after a checkpoint.
LONGER_POLICY = ("policy={'offline': {'total_steps': 3000, 'checkpoint_every': 250, "
                 "'eval_every': 1000}}")


def env_with_bin(extra: dict | None = None) -> dict:
    """This environment with the venv's bin first on PATH (snakemake, dydiff-bench)."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(extra or {})}


def snakemake(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 1200):
    return subprocess.run([str(BIN / "snakemake"), *args], cwd=cwd, env=env_with_bin(env),
                          capture_output=True, text=True, timeout=timeout)


def tail(res, n: int = 4000) -> str:
    return (res.stdout + res.stderr)[-n:]


def copy_repo(dst: Path) -> Path:
    """The project's files (no venv, results or caches) in dst: a repository root of its own,
    for tests that must run Snakemake exactly as a user does from the root."""
    skip = shutil.ignore_patterns(".git", ".venv", "results", ".snakemake", "mlruns",
                                  "__pycache__", ".pytest_cache", ".benchmarks", "*.egg-info")
    shutil.copytree(ROOT, dst, symlinks=True, ignore=skip)
    (dst / "results").mkdir()
    return dst


def training_outputs(out_dir: Path):
    """(metrics without wall time, policy weights, final.json) of a train-policy job."""
    import pandas as pd
    import torch
    return (pd.read_parquet(out_dir / "metrics.parquet").drop(columns="wall_time_s"),
            torch.load(out_dir / "policy.pt", weights_only=True)["state_dict"],
            json.loads((out_dir / "final.json").read_text()))


def assert_same_training(reference: Path, other: Path) -> None:
    """Two runs of one job (e.g. uninterrupted vs interrupted and resumed) ended identically."""
    import pandas as pd
    import torch
    (m_ref, w_ref, f_ref), (m_other, w_other, f_other) = \
        training_outputs(reference), training_outputs(other)
    pd.testing.assert_frame_equal(m_ref, m_other)
    assert w_ref.keys() == w_other.keys()
    assert all(torch.equal(w_ref[k], w_other[k]) for k in w_ref)
    assert f_ref["normalized_score"] == f_other["normalized_score"]


# ---- the tiny reference run, kills, full disks (test_kill_anywhere.py, test_disk_full.py) ----

# Columns / keys that measure time, not results: excepted when two runs are compared.
WALL_TIME_KEYS = frozenset({"wall_time_s", "train_wall_time_s"})
# Provenance, not numbers: the checkout's sha (and -dirty flag) may differ between two runs.
PROVENANCE_KEYS = frozenset({"git_sha"})


def job_logs(results: Path, n: int = 3000) -> str:
    """The end of every job log under results/, for a readable failure message."""
    return "\n".join(f"== {p}\n{p.read_text(errors='replace')[-n:]}"
                     for p in sorted(Path(results).glob("*/logs/**/*.log")))


def run_tiny_dag(results: Path) -> dict:
    """The tiny grid run uninterrupted into `results` (from the repository root, as a user
    does); returns its resolved config. The session's one reference run (conftest.py)."""
    from harness import plan
    res = snakemake("--cores", "2", "--configfile", str(TINY), "--config",
                    f"results_dir={results}")
    assert res.returncode == 0, tail(res) + job_logs(results)
    return plan.load_config(TINY, {"results_dir": str(results)})


def snakemake_in(workdir: Path, *args: str) -> list[str]:
    """A snakemake command line for the repository's Snakefile run in `workdir`: its own
    .snakemake (locks, incomplete markers, metadata), so a test that kills Snakemake leaves
    nothing behind in the checkout's."""
    return [str(BIN / "snakemake"), "--snakefile", str(ROOT / "Snakefile"),
            "--directory", str(workdir), *args]


def session_processes(sid: int) -> dict[int, str]:
    """{pid: command line} of the live processes of session `sid` (Linux /proc)."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            # field 6 of /proc/<pid>/stat, counted after the parenthesised command name
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) != sid or fields[0] == "Z":
                continue
            out[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
    return out


def kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` (Snakemake and the jobs it started) at once,
    then any straggler, until none is left."""
    import signal
    import time
    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.time() + 30
    while (left := session_processes(sid)) and time.time() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    assert not session_processes(sid), f"processes of session {sid} survived SIGKILL"


def wait_for_process(sid: int, fragment: str, timeout: float = 300,
                     proc: subprocess.Popen | None = None) -> bool:
    """Wait until a process of session `sid` runs a command containing `fragment`; False if
    `proc` (the session leader) exits first or the timeout passes."""
    import time
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(fragment in cmd for cmd in session_processes(sid).values()):
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def step_seconds(log: Path) -> float:
    """How long a job's step ran, from harness.runner's "<run> finished in X s" log line."""
    import re
    found = re.findall(r"finished in ([0-9.]+) ?s", Path(log).read_text(errors="replace"))
    assert found, f"{log}: no 'finished in X s' line"
    return float(found[-1])


def _assert_same_tree(a, b, where: str, ignore: frozenset) -> None:
    """Nested dicts / lists / tensors / floats equal: tensors bit for bit, floats exactly
    (NaN equals NaN); keys in `ignore` are skipped at every level."""
    import math
    import torch
    if isinstance(a, dict):
        assert isinstance(b, dict), f"{where}: {type(b).__name__} instead of a dict"
        ka, kb = set(a) - ignore, set(b) - ignore
        assert ka == kb, f"{where}: keys differ: {sorted(map(str, ka ^ kb))}"
        for k in a:
            if k not in ignore:
                _assert_same_tree(a[k], b[k], f"{where}[{k!r}]", ignore)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{where}[{i}]", ignore)
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, \
            f"{where}: tensor dtype/shape differ"
        bits = lambda t: t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
        assert torch.equal(bits(a), bits(b)) if a.dtype.is_floating_point \
            else torch.equal(a.cpu(), b.cpu()), f"{where}: tensors differ"
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_output(reference: Path, other: Path) -> None:
    """One output file of a job equal in another run: the same numbers, wall-time and
    provenance entries excepted. hdf5: every array bit for bit and the attrs; .pt: every
    tensor bit for bit and every value; .json: every value; .parquet / .csv: every cell."""
    import pandas as pd
    reference, other = Path(reference), Path(other)
    assert other.exists(), f"{other} is missing"
    ignore = WALL_TIME_KEYS | PROVENANCE_KEYS
    suffix = reference.suffix
    if suffix == ".hdf5":
        import h5py
        import numpy as np
        with h5py.File(reference, "r") as fa, h5py.File(other, "r") as fb:
            names_a, names_b = [], []
            fa.visit(names_a.append)
            fb.visit(names_b.append)
            assert names_a == names_b, f"{other}: datasets differ"
            for name in names_a:
                if isinstance(fa[name], h5py.Dataset):
                    x, y = fa[name][()], fb[name][()]
                    assert x.dtype == y.dtype and x.shape == y.shape \
                        and np.asarray(x).tobytes() == np.asarray(y).tobytes(), \
                        f"{other}:{name} differs"
            attrs_a = {k: v for k, v in fa.attrs.items() if k not in ignore}
            attrs_b = {k: v for k, v in fb.attrs.items() if k not in ignore}
            assert attrs_a.keys() == attrs_b.keys(), f"{other}: attrs differ"
            for k in attrs_a:
                assert np.array_equal(attrs_a[k], attrs_b[k], equal_nan=isinstance(
                    attrs_a[k], float)), f"{other}: attr {k} differs"
    elif suffix == ".pt":
        import torch
        _assert_same_tree(torch.load(reference, map_location="cpu", weights_only=True),
                          torch.load(other, map_location="cpu", weights_only=True),
                          str(other), ignore)
    elif suffix == ".json":
        _assert_same_tree(json.loads(reference.read_text()), json.loads(other.read_text()),
                          str(other), ignore)
    elif suffix in (".parquet", ".csv"):
        read = pd.read_parquet if suffix == ".parquet" else pd.read_csv
        a, b = read(reference), read(other)
        drop = [c for c in a.columns if c in WALL_TIME_KEYS]
        pd.testing.assert_frame_equal(a.drop(columns=drop), b.drop(columns=drop, errors="ignore"),
                                      check_exact=True, obj=str(other))
    else:
        assert reference.read_bytes() == other.read_bytes(), f"{other} differs"


def mounted_tmpfs(path: Path, size: int):
    """Context: a tmpfs of `size` bytes mounted at `path` (a real full disk to fill up);
    pytest.skip with the reason where one cannot be mounted (not root, not Linux, no
    CAP_SYS_ADMIN in a container)."""
    from contextlib import contextmanager
    import pytest

    @contextmanager
    def mount():
        if not sys.platform.startswith("linux") or os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root on Linux (CI runs as root)")
        if not (shutil.which("mount") and shutil.which("umount")):
            pytest.skip("no mount / umount command")
        path.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {(res.stderr or res.stdout).strip()}")
        try:
            yield path
        finally:
            if subprocess.run(["umount", str(path)]).returncode != 0:
                subprocess.run(["umount", "-l", str(path)])  # busy: detach it anyway
    return mount()


def leave_free(path: Path, free: int) -> Path:
    """Fill the filesystem of `path` with a file (returned; delete it to free the space) so
    that about `free` bytes stay available."""
    st = os.statvfs(path)
    filler = path / ".filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(st.f_bavail * st.f_frsize - free, 0))
    return filler
