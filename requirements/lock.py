"""The locked environment's targets and torch builds, and the steps of `make lock` / `make install`.

Standard library only: `make install` runs it with the bare interpreter, before any venv exists.
The lock is two PEP 751 files resolved by `uv pip compile --universal` for every target below:
  pylock.cpu.toml   every package, torch's CPU build on macOS (PyPI) included; on Linux torch
                    itself is the one package outside it (TORCH_BUILDS: the +cpu and +cu12x
                    wheels live only on download.pytorch.org, which uv must read to lock them)
  pylock.cu13.toml  every package with PyPI's torch, the CUDA 13 build on Linux, and its CUDA
                    libraries, all hashed
Usage: python requirements/lock.py check BUILD | gpu-build | lock-file BUILD | pins BUILD NAME...
       | torch[-unlocked] BUILD [FIND_LINKS...] | lock UV [--upgrade | --upgrade-package=NAME] [FIND_LINKS...]
"""
from __future__ import annotations

import email.parser
import platform
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TORCH_VERSION = "2.13.0"
# (sys.platform, platform.machine()) -> name; the `environments` of pyproject.toml's [tool.uv].
PLATFORMS = {("linux", "x86_64"): "Linux x86_64", ("linux", "aarch64"): "Linux aarch64",
             ("darwin", "arm64"): "macOS arm64"}
# CPython 3.14 is resolved too but not covered: arch 7.2.0 (rliable's, with pandas < 3) and
# immutables publish no cp314 wheels (tests/test_lock.py says when they do).
PYTHONS = ((3, 11), (3, 12), (3, 13))
# torch build -> the lock it installs, the platforms it exists on, and torch when not in the lock:
# (requirement, where uv finds it, whether its own dependencies come with it).
TORCH_BUILDS = {
    "cpu": {"lock": "pylock.cpu.toml", "platforms": set(PLATFORMS),
            # on Linux only: the +cpu wheel's requirements are in the lock (torch-cpu.in), so no deps
            "linux": (f"torch=={TORCH_VERSION}+cpu", "https://download.pytorch.org/whl/cpu/torch/", False)},
    # CUDA 12.8: the same lock as cpu, and torch's CUDA 12 libraries (nvidia-*-cu12, triton), which
    # torch pins exactly (==) in its metadata, from PyTorch's index at install time, unhashed.
    "cu12": {"lock": "pylock.cpu.toml", "platforms": {("linux", "x86_64"), ("linux", "aarch64")},
             "linux": (f"torch=={TORCH_VERSION}+cu128", "https://download.pytorch.org/whl/cu128", True)},
    "cu13": {"lock": "pylock.cu13.toml", "platforms": {("linux", "x86_64"), ("linux", "aarch64")}},
}
# NVIDIA driver (Linux) -> build: CUDA 13.0 needs r580; every CUDA 12.x runtime runs on r525 and
# newer (CUDA's minor-version compatibility; r570 for CUDA 12.8's full feature set).
DRIVER_MIN = (("cu13", 580), ("cu12", 525))


def build_name(build: str) -> str:
    return "cu13" if build == "cuda" else build  # a venv made before cu12 existed says "cuda"


def target_problem(build: str, py=None, plat=None) -> str | None:
    """One line saying why this interpreter / platform is not covered, or None."""
    py = py or tuple(sys.version_info[:2])
    plat = plat or (sys.platform, platform.machine())
    build = build_name(build)
    if build not in TORCH_BUILDS:
        return f"TORCH_BUILD={build} is not a torch build of the lock (one of: {', '.join(TORCH_BUILDS)})"
    covered = TORCH_BUILDS[build]["platforms"]
    if sys.implementation.name == "cpython" and py in PYTHONS and plat in covered:
        return None
    here = f"{sys.implementation.name} {py[0]}.{py[1]} on {plat[0]} {plat[1]}"
    return (f"the lock (requirements/) covers CPython {PYTHONS[0][0]}.{PYTHONS[0][1]}-"
            f"{PYTHONS[-1][0]}.{PYTHONS[-1][1]} on {', '.join(PLATFORMS[p] for p in PLATFORMS if p in covered)} "
            f"for torch build {build}; this is {here}: use a covered Python (PYTHON=...), "
            f"or \"make install LOCKED=0\" (unlocked)")


def build_for_driver(driver: str) -> str:
    """The CUDA build an NVIDIA driver version ("580.65.06") runs, or SystemExit with one line."""
    major = int(driver.split(".")[0])
    for build, least in DRIVER_MIN:
        if major >= least:
            return build
    raise SystemExit(f"make install-gpu: NVIDIA driver {driver} is older than {DRIVER_MIN[-1][1]}, the oldest "
                     "a CUDA build of the lock runs on (README: Locked environment); update the driver "
                     "or use the CPU build (make install)")


def gpu_build() -> str:
    """The CUDA build for this machine's NVIDIA driver (nvidia-smi), or exit with one line."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as err:
        sys.exit(f"make install-gpu: no NVIDIA driver found (nvidia-smi: {err}); name the build "
                 f"instead: make install-gpu CUDA=cu13 (driver >= 580) or CUDA=cu12 (driver >= 525)")
    return build_for_driver(out[0])


def cpu_wheel_requirements(find_links: list[str]) -> list[str]:
    """Requires-Dist of torch's +cpu wheel (any Python / platform: one metadata), from a folder."""
    for folder in map(Path, find_links):
        for wheel in sorted(folder.glob(f"torch-{TORCH_VERSION}+cpu-*.whl")):
            with zipfile.ZipFile(wheel) as zf:
                meta = zf.read(f"torch-{TORCH_VERSION}+cpu.dist-info/METADATA").decode()
            return [r for r in email.parser.Parser().parsestr(meta).get_all("Requires-Dist")
                    if "extra ==" not in r]
    return []


def write_cpu_requirements(find_links: list[str]) -> None:
    """requirements/torch-cpu.in: the +cpu wheel's own requirements, on Linux in torch's place."""
    path = HERE / "torch-cpu.in"
    reqs = cpu_wheel_requirements(find_links)
    if not reqs:  # no wheel at hand: the file must already be for this torch version
        if f"torch {TORCH_VERSION}+cpu" not in path.read_text():
            sys.exit(f"make lock: no torch-{TORCH_VERSION}+cpu wheel in {find_links or 'TORCH_CPU_LINKS'} "
                     f"and {path.name} is for another torch: give a folder holding the wheel")
        return
    lines = [f"{r.split(';')[0].strip()} ; sys_platform == 'linux'" for r in reqs]
    path.write_text(f"# Written by `make lock` from the METADATA of torch {TORCH_VERSION}+cpu (one for every\n"
                    "# Python and platform): resolved on Linux in place of torch itself, which make install\n"
                    "# adds with --no-deps (requirements/lock.py: TORCH_BUILDS). Do not edit.\n"
                    + "\n".join(lines) + "\n")


def lock(uv: str, find_links: list[str], extra: tuple[str, ...] = ()) -> None:
    """Re-resolve both pylock files (PyPI only: the +cpu torch is replaced by its requirements).
    uv keeps each version the files already pin unless `extra` says --upgrade(-package=NAME)."""
    common = [uv, "pip", "compile", "pyproject.toml", "--universal", "--python-version", "3.11",
              "--extra", "test", "--extra", "slurm", "--fork-strategy", "fewest",
              "--custom-compile-command", "make lock", "--quiet", *extra]
    root = HERE.parent
    with tempfile.TemporaryDirectory() as tmp:
        override = Path(tmp) / "torch.txt"
        override.write_text(f"torch=={TORCH_VERSION}\n")
        subprocess.run(common + ["--override", str(override), "-o", "requirements/pylock.cu13.toml"],
                       cwd=root, check=True)
        # the same versions in both files: every pin of the cu13 lock constrains the cpu one
        pins = tomllib.loads((HERE / "pylock.cu13.toml").read_text())["packages"]
        constraints = Path(tmp) / "pins.txt"
        lines = [f"{p['name']}=={p['version']}" + (f" ; {p['marker']}" if "marker" in p else "")
                 for p in pins if p["name"] != "torch"]
        constraints.write_text("\n".join(lines) + "\n")
        override.write_text(f"torch=={TORCH_VERSION} ; sys_platform == 'darwin'\n")
        write_cpu_requirements(find_links)
        subprocess.run(common + ["requirements/torch-cpu.in", "--override", str(override),
                                 "--constraint", str(constraints), "-o", "requirements/pylock.cpu.toml"],
                       cwd=root, check=True)


def torch_args(build: str, find_links: list[str], locked: bool = True) -> list[str]:
    """uv's arguments that add torch where the build's lock leaves it out (Linux cpu / cu12), else
    none; unlocked (LOCKED=0), torch of TORCH_VERSION with its dependencies everywhere. A folder
    of FIND_LINKS (pip's find-links, TORCH_CPU_LINKS) holding this interpreter's +cpu wheel wins."""
    spec = TORCH_BUILDS[build_name(build)].get(sys.platform)
    if spec is None:
        return [] if locked else [f"torch=={TORCH_VERSION}"]
    requirement, where, deps = spec
    source = ["--index", where]
    if where.endswith("/torch/"):  # a find-links page
        tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
        folders = [f for f in find_links
                   if list(Path(f).glob(f"torch-{TORCH_VERSION}+cpu-{tag}-{tag}-*_{platform.machine()}.whl"))]
        source = ["--find-links", folders[0] if folders else where]
    return [requirement, *source] + ([] if deps or not locked else ["--no-deps"])


def pins(build: str, names: list[str]) -> list[str]:
    """name==version of each named package in BUILD's lock (one version on every target: the
    lock is resolved with --fork-strategy fewest, and tests/test_lock.py checks it)."""
    locked = {p["name"]: p["version"] for p in
              tomllib.loads((HERE / TORCH_BUILDS[build_name(build)]["lock"]).read_text())["packages"]}
    missing = [n for n in names if n not in locked]
    if missing:
        sys.exit(f"requirements/lock.py pins: not in the {build} lock: {' '.join(missing)}")
    return [f"{n}=={locked[n]}" for n in names]


def main(argv: list[str]) -> None:
    cmd, args = (argv[0], argv[1:]) if argv else ("", [])
    if cmd == "check":
        problem = target_problem(args[0])
        if problem:
            sys.exit(problem)
    elif cmd == "gpu-build":
        print(gpu_build())
    elif cmd == "lock-file":
        print(TORCH_BUILDS[build_name(args[0])]["lock"])
    elif cmd in ("torch", "torch-unlocked"):
        print(" ".join(torch_args(args[0], args[1:], locked=cmd == "torch")))
    elif cmd == "pins":  # name==version of the named packages, as BUILD's lock pins them
        print("\n".join(pins(args[0], args[1:])))
    elif cmd == "lock":  # uv's --upgrade / --upgrade-package=NAME pass through
        options = tuple(a for a in args[1:] if a.startswith("--"))
        lock(args[0], [a for a in args[1:] if a not in options], options)
    else:
        sys.exit(__doc__[__doc__.index("Usage:"):].rstrip())


if __name__ == "__main__":
    main(sys.argv[1:])
