"""The venv is the lock: every package of requirements/<build>.txt installed at exactly its
locked version, nothing else installed; and the locks cover pyproject.toml's dependencies."""
from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest

from harness.provenance import installed

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==(\S+)", re.MULTILINE)
# Installed by the Makefile around the lock, not part of it.
OUTSIDE_LOCK = {"pip", "dydiff-bench", "uv"}


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def locked(build: str) -> dict[str, str]:
    text = (ROOT / "requirements" / f"{build}.txt").read_text()
    return {canonical(name): version for name, version in PIN.findall(text)}


def test_both_locks_pin_the_same_versions_but_torch_build():
    cpu, cuda = locked("cpu"), locked("cuda")
    assert cpu.pop("torch") == cuda["torch"] + "+cpu"
    cuda.pop("torch")
    cuda_only = {k for k in cuda if k not in cpu}
    assert cuda_only and all(k.startswith(("nvidia-", "cuda-", "triton")) for k in cuda_only)
    assert {k: cuda[k] for k in cpu} == cpu


def test_locks_cover_every_declared_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [d for extra in ("test", "slurm")
                                          for d in project["optional-dependencies"][extra]]
    names = {canonical(re.match(r"[A-Za-z0-9_.\-]+", d).group(0)) for d in declared}
    for build in ("cpu", "cuda"):
        assert names - set(locked(build)) == set(), build


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="not running in a venv")
def test_venv_matches_its_lock():
    """What `make install` promises: exactly the lock of the venv's torch build."""
    marker = Path(sys.prefix) / ".torch-build"
    if not marker.exists():
        pytest.skip("venv not made by `make install` (no .torch-build)")
    build = marker.read_text().strip()
    lock, have = locked(build), installed()
    wrong = {k: (v, have.get(k)) for k, v in lock.items() if have.get(k) != v}
    extra = set(have) - set(lock) - OUTSIDE_LOCK
    assert not wrong, f"installed versions differ from requirements/{build}.txt: {wrong}"
    assert not extra, f"installed but not in requirements/{build}.txt: {sorted(extra)}"
