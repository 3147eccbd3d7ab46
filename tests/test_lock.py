"""The lock (requirements/pylock.*.toml, requirements/lock.py) covers every supported target, and
the venv is the lock: every package the lock selects for this interpreter installed at exactly its
locked version, nothing else. Offline: the pylock files name every wheel they pin."""
from __future__ import annotations

import importlib.util
import re
import sys
import sysconfig
import tomllib
from functools import cache
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

from harness.provenance import installed

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("lock", ROOT / "requirements" / "lock.py")
lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock)

# Installed around the lock, not part of it: the project itself, and the venv's seed packages
# (`uv venv --seed`: pip; wheel on CPython < 3.12; setuptools where the lock does not select it).
OUTSIDE_LOCK = {"pip", "wheel", "dydiff-bench"}
# The oldest platform each target's wheels must run on: glibc 2.28 (torch's own floor: RHEL 8,
# Ubuntu 20.04 and newer) and macOS 14 (torch's arm64 wheels).
GLIBC_MINOR, MACOS_MAJOR = 28, 14
# Pure-Python packages that publish no wheel: uv builds them at install, the same on every target.
SDIST_ONLY = {"connection-pool", "rliable"}


def platform_tags(plat: tuple[str, str]) -> list[str]:
    system, machine = plat
    if system == "linux":
        legacy = {"x86_64": ["manylinux2014", "manylinux2010", "manylinux1"], "aarch64": ["manylinux2014"]}
        return ([f"manylinux_2_{m}_{machine}" for m in range(GLIBC_MINOR, 4, -1)]
                + [f"{name}_{machine}" for name in legacy[machine]] + [f"linux_{machine}"])
    return [f"macosx_{major}_0_{arch}" for major in range(MACOS_MAJOR, 10, -1) for arch in ("arm64", "universal2")] \
        + [f"macosx_10_{minor}_universal2" for minor in range(16, 8, -1)]


@cache
def target_tags(py: tuple[int, int], plat: tuple[str, str]) -> frozenset[Tag]:
    cp, platforms = f"cp{py[0]}{py[1]}", platform_tags(plat)
    return frozenset([*cpython_tags(py, [cp], platforms), *compatible_tags(py, cp, platforms)])


def marker_env(py: tuple[int, int], plat: tuple[str, str]) -> dict[str, str]:
    system = {"linux": "Linux", "darwin": "Darwin"}[plat[0]]
    return {"python_version": f"{py[0]}.{py[1]}", "python_full_version": f"{py[0]}.{py[1]}.0",
            "sys_platform": plat[0], "platform_machine": plat[1], "platform_system": system,
            "os_name": "posix", "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "implementation_version": f"{py[0]}.{py[1]}.0", "platform_release": "", "platform_version": "",
            "extra": ""}


@cache
def packages(lock_file: str) -> tuple[dict, ...]:
    return tuple(tomllib.loads((ROOT / "requirements" / lock_file).read_text())["packages"])


def selected(build: str, env: dict[str, str]) -> dict[str, dict]:
    """The lock's packages for one target: those whose marker holds there."""
    chosen = {}
    for package in packages(lock.TORCH_BUILDS[build]["lock"]):
        if Marker(package.get("marker", "python_version >= '0'")).evaluate(env):
            name = canonicalize_name(package["name"])
            assert name not in chosen, f"{name} twice for {env['python_version']} {env['sys_platform']}"
            chosen[name] = package
    return chosen


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [d for extra in ("test", "slurm")
                                      for d in project["optional-dependencies"][extra]]
    return {canonicalize_name(re.match(r"[A-Za-z0-9_.\-]+", d).group(0)) for d in reqs}


TARGETS = [(build, py, plat) for build, spec in lock.TORCH_BUILDS.items()
           for py in lock.PYTHONS for plat in lock.PLATFORMS if plat in spec["platforms"]]


@pytest.mark.parametrize("build,py,plat", TARGETS,
                         ids=[f"{b}-{p[0]}.{p[1]}-{s}-{m}" for b, p, (s, m) in TARGETS])
def test_lock_covers_target(build, py, plat):
    """A gap fails here: a declared dependency or torch missing for a target, or a locked package
    with no wheel that installs there (an sdist would be built on the user's machine)."""
    assert lock.target_problem(build, py, plat) is None
    chosen = selected(build, marker_env(py, plat))
    outside = lock.TORCH_BUILDS[build].get(plat[0])  # torch from PyTorch's index (Linux cpu/cu12)
    assert ("torch" in chosen) == (outside is None)
    if outside:
        assert outside[0] == f"torch=={lock.TORCH_VERSION}+{ {'cpu': 'cpu', 'cu12': 'cu128'}[build] }"
    missing = declared() - set(chosen) - ({"torch"} if outside else set())
    assert not missing, f"declared but not locked for this target: {sorted(missing)}"
    tags = target_tags(py, plat)
    no_wheel = {name for name, package in chosen.items()
                if not any(tags & parse_wheel_filename(Path(w["url"]).name)[3]
                           for w in package.get("wheels", []))}
    assert no_wheel <= SDIST_ONLY, f"no wheel for CPython {py[0]}.{py[1]} on {plat}: {sorted(no_wheel - SDIST_ONLY)}"
    assert all("sdist" in chosen[name] for name in no_wheel)
    assert all(w["hashes"]["sha256"] for p in chosen.values() for w in p.get("wheels", []))


def test_python_314_gap_is_the_documented_one():
    """CPython 3.14 is left out of lock.PYTHONS for these two packages only (README): when they
    publish cp314 wheels this fails, and 3.14 joins the covered targets."""
    plat = ("linux", "x86_64")
    chosen = selected("cpu", marker_env((3, 14), plat))
    no_wheel = {name for name, package in chosen.items()
                if not any(target_tags((3, 14), plat) & parse_wheel_filename(Path(w["url"]).name)[3]
                           for w in package.get("wheels", []))}
    assert no_wheel - SDIST_ONLY == {"arch", "immutables"}


def test_one_version_of_each_package_in_every_build():
    """The builds differ in torch and its CUDA libraries only; torch is one version everywhere."""
    def versions(lock_file):
        return {(canonicalize_name(p["name"]), p.get("marker")): p["version"] for p in packages(lock_file)}
    for lock_file in ("pylock.cpu.toml", "pylock.cu13.toml"):  # one version on every target
        names_ = [canonicalize_name(p["name"]) for p in packages(lock_file)]
        assert len(names_) == len(set(names_)), lock_file
    locked = {name: version for (name, _), version in versions("pylock.cpu.toml").items()}
    assert lock.pins("cpu", ["mujoco", "numpy"]) == [f"mujoco=={locked['mujoco']}", f"numpy=={locked['numpy']}"]
    cpu, cu13 = versions("pylock.cpu.toml"), versions("pylock.cu13.toml")
    names = lambda pins: {name for name, _ in pins}  # noqa: E731
    assert {v for (n, _), v in cu13.items() if n == "torch"} == {lock.TORCH_VERSION}
    assert {v for (n, _), v in cpu.items() if n == "torch"} == {lock.TORCH_VERSION}  # macOS
    cuda_only = names(cu13) - names(cpu)
    assert cuda_only and all(n.startswith(("nvidia-", "cuda-", "triton")) for n in cuda_only)
    cpu_versions = {n: v for (n, _), v in cpu.items()}
    assert {n: v for (n, _), v in cu13.items() if n in cpu_versions and n != "torch"} == \
        {n: v for n, v in cpu_versions.items() if n != "torch"}


@pytest.fixture
def torch_build_marker() -> Path:
    """The .torch-build file of the venv `make install` made (which this test runs in); else skip."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("not running in a venv")
    marker = Path(sys.prefix) / ".torch-build"
    if not marker.exists():
        pytest.skip("venv not made by `make install` (no .torch-build)")
    return marker


def test_venv_matches_its_lock(torch_build_marker):
    """What `make install` promises: exactly the lock of the venv's torch build."""
    build = lock.build_name(torch_build_marker.read_text().strip())
    want = {name: p["version"] for name, p in selected(build, default_env()).items()}
    outside = lock.TORCH_BUILDS[build].get(sys.platform)
    if outside:
        want["torch"] = outside[0].split("==")[1]
    have = installed()
    wrong = {k: (v, have.get(k)) for k, v in want.items() if have.get(k) != v}
    extra = set(have) - set(want) - OUTSIDE_LOCK - ({"setuptools"} if "setuptools" not in want else set())
    if build == "cu12":  # torch's CUDA 12 libraries, pinned by torch itself (README: Locked environment)
        extra = {n for n in extra if not n.startswith(("nvidia-", "cuda-", "triton"))}
    lock_file = lock.TORCH_BUILDS[build]["lock"]
    assert not wrong, f"installed versions differ from requirements/{lock_file}: {wrong}"
    assert not extra, f"installed but not in requirements/{lock_file}: {sorted(extra)}"


def test_venv_is_compiled_to_bytecode(torch_build_marker):
    """`make install` compiles every installed module (Makefile: UV_COMPILE_BYTECODE). Without it,
    where PYTHONDONTWRITEBYTECODE is set (CI) each job's process compiles torch, mlflow, ... from
    source: about 9 s a process. A test run writes .pyc only for what it imports, far fewer."""
    site = Path(sysconfig.get_paths()["purelib"])
    sources = list(site.rglob("*.py"))
    compiled = sum(Path(importlib.util.cache_from_source(str(f))).exists() for f in sources)
    assert compiled >= 0.95 * len(sources), (
        f"{site}: {compiled} of {len(sources)} modules have bytecode; `make install` compiles "
        f"them all (UV_COMPILE_BYTECODE=1 in the Makefile)")


def default_env() -> dict[str, str]:
    from packaging.markers import default_environment
    return {**default_environment(), "extra": ""}


def test_install_gpu_picks_the_build_its_driver_runs():
    assert lock.build_for_driver("580.65.06") == "cu13"
    assert lock.build_for_driver("575.51.03") == "cu12"
    assert lock.build_for_driver("525.60.13") == "cu12"
    with pytest.raises(SystemExit, match="driver 470.256.02 is older than 525"):
        lock.build_for_driver("470.256.02")


def test_an_uncovered_target_is_refused_in_one_line():
    for problem in (lock.target_problem("cpu", (3, 10), ("linux", "x86_64")),
                    lock.target_problem("cu13", (3, 12), ("darwin", "arm64")),
                    lock.target_problem("cpu", (3, 12), ("win32", "AMD64"))):
        assert problem and "\n" not in problem and "LOCKED=0" in problem
    assert "3.10" in lock.target_problem("cpu", (3, 10), ("linux", "x86_64"))
    assert "not a torch build" in lock.target_problem("cu11", (3, 12), ("linux", "x86_64"))
    assert lock.target_problem("cuda", (3, 11), ("linux", "aarch64")) is None  # an older venv's name
