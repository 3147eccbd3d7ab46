#!/usr/bin/env bash
# The prepared GPU check (scripts/gpu_check.py says what it measures). Two steps:
#
#   bash scripts/gpu_check.sh prepare   # here, with the package index: the wheels the GPU
#                                       # machine lacks, into .gpu-wheels/ (git-ignored)
#   bash scripts/gpu_check.sh run       # on the GPU machine (no network): installs them from
#                                       # .gpu-wheels/, runs the check, results in $OUT
#
# The GPU machine brings its own CUDA torch (the check records which); the harness needs a few
# packages more (MuJoCo, gymnasium, jsonschema), at the versions of requirements/cpu.txt.
# Budget: 8 minutes end to end (--quick for a dry run on a CPU: `run --device cpu --quick`).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.gpu-wheels
PACKAGES="mujoco mujoco-core mujoco-studio glfw pyopengl gymnasium farama-notifications \
gymnasium-robotics jsonschema jsonschema-specifications referencing rpds-py"
PYTHON=${PYTHON:-python3}

pinned() {  # name==version of each package, as requirements/cpu.txt locks it
    for p in $PACKAGES; do grep -oE "^$p==[^ ]+" requirements/cpu.txt; done
}

case "${1:-}" in
prepare)
    PYVER=${GPU_PYTHON_VERSION:-3.12}   # the GPU machine's python (device tool: KINDS.md)
    mkdir -p "$WHEELS"
    # shellcheck disable=SC2046
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WHEELS" \
        --python-version "$PYVER" --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 $(pinned)
    du -sh "$WHEELS"
    ;;
run)
    shift
    OUT=${OUT:-results/gpu-check}
    mkdir -p "$OUT"
    "$PYTHON" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" $(pinned)
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
    { "$PYTHON" -m pytest -q tests/test_devices.py -p no:cacheprovider 2>&1 || true; } | tail -5 \
        | tee "$OUT/test_devices.txt"
    timeout 480 "$PYTHON" scripts/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
    ;;
*)
    echo "usage: bash scripts/gpu_check.sh prepare | run [--device cpu --quick]" >&2
    exit 2
    ;;
esac
