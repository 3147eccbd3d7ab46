#!/usr/bin/env bash
# The prepared GPU check (scripts/gpu_check.py says what it measures and its time budget).
#
#   bash scripts/gpu_check.sh prepare   # here, with the package index: the wheels the GPU
#                                       # machine lacks, into .gpu-wheels/ (git-ignored)
#   bash scripts/gpu_check.sh run       # on the GPU machine: install them, run the check
#   bash scripts/gpu_check.sh run --device cpu --quick   # the dry run (tests/test_gpu_check.py)
#
# Carry `.gpu-wheels` to the GPU machine (it is git-ignored, so it travels only when carried):
# PACKAGES below, ~10 MB at the lock's versions (requirements/lock.py pins): MuJoCo (and its glfw, pyopengl,
# mujoco-core, mujoco-studio), gymnasium (farama-notifications) and jsonschema (its
# specifications, referencing, rpds-py). Everything else the check imports is in the image
# (scripts/gpu_image_packages.txt; the CI test blocks all other imports). No maze2d simulator:
# gymnasium-robotics and its pettingzoo are not needed (the check runs hopper and prices mazes
# by their dimensions alone).
#
# Installed as the GPU machine's documentation says: into /tmp/site with --no-index --no-deps
# --no-compile, found through PYTHONPATH (the image's own Python and torch stay untouched).
# No `set -e`: every step runs and writes its file; the exit code is the check's own.
# Files under $OUT (at most 8, none in folders): nvidia-smi.txt, pytest.txt, gpu_check.log, and
# the check's results.jsonl and estimate.md. Budget: 46 s before the check, `timeout 360` on it:
# under 7 minutes (scripts/gpu_check.py's arithmetic; GPU_CHECK_TIMEOUT=<s> changes the 360).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${GPU_WHEELS:-.gpu-wheels}
SITE=${GPU_SITE:-/tmp/site}
PACKAGES="mujoco mujoco-core mujoco-studio glfw pyopengl gymnasium farama-notifications \
jsonschema jsonschema-specifications referencing rpds-py"
PYTHON=${PYTHON:-python3}

pinned() {  # name==version of each package, as the lock pins it (stdlib only: runs anywhere)
    # shellcheck disable=SC2086
    "$PYTHON" requirements/lock.py pins cpu $PACKAGES
}

case "${1:-}" in
prepare)
    PYVER=${GPU_PYTHON_VERSION:-3.12}   # the GPU machine's python
    mkdir -p "$WHEELS"
    # shellcheck disable=SC2046
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WHEELS" \
        --python-version "$PYVER" --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 $(pinned)
    du -sh "$WHEELS"
    ;;
run)
    shift
    OUT=${OUT:-results/gpu-check}
    mkdir -p "$OUT"
    LOG="$OUT/gpu_check.log"
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$SITE" "$WHEELS"/*.whl >>"$LOG" 2>&1 \
            || echo "gpu_check.sh: pip install from $WHEELS failed (see above)" >>"$LOG"
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu_check.sh: no wheels in $WHEELS: run 'prepare' here and carry it;" \
             "going on with the packages this Python has" | tee -a "$LOG"
    fi
    if nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1; then
        # The GPU tests of the suite (skipped on a CPU), whole tracebacks kept.
        PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 120 "$PYTHON" -m pytest -q \
            -p no:cacheprovider --tb=long tests/test_devices.py >"$OUT/pytest.txt" 2>&1
        echo "pytest tests/test_devices.py: rc $?" >>"$OUT/pytest.txt"
    else
        echo "pytest: not run (no GPU: nvidia-smi failed)" >"$OUT/pytest.txt"
    fi
    timeout "${GPU_CHECK_TIMEOUT:-360}" "$PYTHON" scripts/gpu_check.py --out "$OUT" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    echo "gpu_check.sh: gpu_check.py exit code $rc" | tee -a "$LOG"
    exit "$rc"
    ;;
*)
    echo "usage: bash scripts/gpu_check.sh prepare | run [--device cpu --quick]" >&2
    exit 2
    ;;
esac
