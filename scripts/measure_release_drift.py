"""How far data recorded in other MuJoCo releases replays in today's: the numbers behind
harness/data/consistency.py's per-family tolerances (docs/physics-drift.md).

For every release given (`--release PYTHON[@PYTHONPATH]`: an interpreter whose environment has
that mujoco, numpy and h5py, optionally with a folder put first on its PYTHONPATH) and today's
(this interpreter), scripts/record_release.py records each family in each of its models, in
that release: hopper, walker2d (walker2d.xml and walker2d_v5.xml), halfcheetah, the point mass
of maze2d (maze2d-umaze's simulator), plus deliberately wrong models (a changed friction, 10 %
more torso / particle mass, 10 % more joint damping for the point). Each file is then replayed
here, in today's MuJoCo, by the harness's own check (consistency.row_errors)
in every candidate model of its task, with float64 states and with the states rounded to
float32 as D4RL stores them. Per (release, family, recorded model, candidate model, states):
the per-row max-abs error quantiles median / 0.99 / 0.999 / max.

Offline preparation (not done by this script; nothing downloads when it runs), e.g. one
throwaway environment per release:

    python3 -m venv ENV && ENV/bin/pip install mujoco==2.3.7 h5py "numpy<2"

or one environment with numpy<2, h5py, absl-py, glfw, pyopengl, etils[epath] and each release in
its own folder (`pip install --no-deps --target DIR/2.3.7 mujoco==2.3.7`), passed as
`--release ENV/bin/python@DIR/2.3.7`. Then:

    python scripts/measure_release_drift.py --release ENV/bin/python@DIR/2.3.7 ... \
        --workdir WORK --json drift.json --markdown drift.md
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import maze2d  # noqa: E402
from harness.data import consistency  # noqa: E402
from harness.data.dataset import Dataset  # noqa: E402
from harness.envs import model_file, task_spec  # noqa: E402

RECORDER = ROOT / "scripts" / "record_release.py"
MAZE_TASK = "maze2d-umaze"
QUANTILES = (0.5, 0.99, 0.999, 1.0)

# family -> task name the harness checks it as
TASK = {"hopper": "hopper-random", "walker2d": "walker2d-random",
        "halfcheetah": "halfcheetah-random", "maze2d": MAZE_TASK}


# ---- models: the installed assets and deliberately wrong copies -----------------------------

def _set_attr(root: ET.Element, xpath: str, attr: str, fn) -> int:
    found = root.findall(xpath)
    for el in found:
        el.set(attr, fn(el.get(attr)))
    if not found:
        raise ValueError(f"no element {xpath} in the model")
    return len(found)


def _scale(factor: float):
    return lambda v: " ".join(f"{float(x) * factor:.10g}" for x in v.split())


def maze_xml(workdir: Path) -> Path:
    """maze2d-umaze's MJCF as gymnasium-robotics builds it (PointMaze's point.xml + walls)."""
    from gymnasium_robotics.envs.maze.maze import Maze
    import gymnasium_robotics.envs.maze.point_maze as pm
    point = Path(pm.__file__).resolve().parents[1] / "assets" / "point" / "point.xml"
    sim_map = [[int(c == "#") for c in row] for row in maze2d.MAZES["umaze"].layout]
    _maze, tmp = Maze.make_maze(str(point), sim_map, 1.0, 0.5)
    out = workdir / "maze2d_umaze.xml"
    out.write_text(Path(tmp).read_text())
    os.remove(tmp)
    return out


def variants(family: str, workdir: Path) -> dict[str, dict]:
    """{label: {"xml": path, "right": the harness model it is (None: a wrong model)}}."""
    if family == "maze2d":
        base = maze_xml(workdir)
        spec_model = task_spec(MAZE_TASK).models[0]
        out = {spec_model: {"xml": base, "right": spec_model}}
        changes = {"damping x1.1": ("./default/joint", "damping", _scale(1.1)),
                   "particle mass x1.1": ("./default/geom", "density", _scale(1.1))}
    else:
        models = task_spec(family).models
        out = {m: {"xml": model_file(m), "right": m} for m in models}
        base = model_file(models[0])
        torso = ".//geom[@name='torso']" if family == "halfcheetah" \
            else ".//geom[@name='torso_geom']"
        changes = {"torso mass x1.1": (torso, "density", lambda v: "1100")}
        if family == "hopper":
            changes["foot friction 2.0->1.0"] = (".//geom[@name='foot_geom']", "friction",
                                                 lambda v: "1.0")
        elif family == "halfcheetah":
            changes["friction 0.4->0.6"] = ("./default/geom", "friction",
                                            lambda v: "0.6 0.1 0.1")
    for label, (xpath, attr, fn) in changes.items():
        tree = ET.parse(base)
        _set_attr(tree.getroot(), xpath, attr, fn)
        path = workdir / f"{family}_{label.replace(' ', '_').replace('>', '')}.xml"
        # Relative asset paths (none in these models) would resolve next to the copy.
        tree.write(path)
        out[f"{base.name}, {label}"] = {"xml": path, "right": None}
    return out


# ---- recording (in the release's own interpreter) -------------------------------------------

def interpreter(spec: str) -> tuple[list[str], dict]:
    python, _, pythonpath = spec.partition("@")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return [python], env


def release_version(spec: str) -> str:
    cmd, env = interpreter(spec)
    return subprocess.run([*cmd, "-c", "import mujoco; print(mujoco.__version__)"], env=env,
                          check=True, capture_output=True, text=True).stdout.strip()


# --via-gymnasium: the release's own gymnasium env per family (its own model file)
GYMNASIUM_V4 = {"hopper": ("Hopper-v4", "hopper.xml"), "walker2d": ("Walker2d-v4", "walker2d.xml"),
                "halfcheetah": ("HalfCheetah-v4", "half_cheetah.xml")}


def record(spec: str, family: str, xml: Path | None, out: Path, steps: int, seed: int,
           state_dtype: str = "float64", actions: str = "mixed",
           gymnasium: str | None = None) -> Path:
    cmd, env = interpreter(spec)
    recorder_family = "pointmass" if family == "maze2d" else family
    model = ["--gymnasium", gymnasium] if gymnasium else ["--xml", str(xml)]
    args = [*cmd, str(RECORDER), "--family", recorder_family, *model, "--out",
            str(out), "--steps", str(steps), "--seed", str(seed), "--actions", actions,
            "--state-dtype", state_dtype]
    if family == "maze2d":
        maze = maze2d.MAZES["umaze"]
        args += ["--episode-steps", str(maze.max_episode_steps), "--reset-points",
                 json.dumps(maze2d.to_sim_pos(maze, maze.free_cells).tolist())]
    subprocess.run(args, env=env, check=True, capture_output=True, text=True)
    return out


def to_d4rl_maze(arrays: dict) -> dict:
    """The recorder's point-mass file (simulator coordinates) in D4RL's maze2d coordinates."""
    maze = maze2d.MAZES["umaze"]
    out = dict(arrays)

    def obs(o):
        return np.concatenate([maze2d.from_sim_pos(maze, o[:, :2]),
                               maze2d.from_sim_vec(o[:, 2:])], 1)
    out["observations"], out["next_observations"] = (obs(arrays["observations"]),
                                                     obs(arrays["next_observations"]))
    out["actions"] = maze2d.from_sim_vec(arrays["actions"])
    out["qpos"] = maze2d.from_sim_pos(maze, arrays["qpos"])
    out["qvel"] = maze2d.from_sim_vec(arrays["qvel"])
    return out


def read(path: Path, family: str, state_dtype) -> Dataset:
    with h5py.File(path, "r") as f:
        arrays = {k: f[k][()] for k in ("observations", "actions", "rewards",
                                        "next_observations", "terminals", "timeouts")}
        arrays["qpos"], arrays["qvel"] = f["infos/qpos"][()], f["infos/qvel"][()]
    if family == "maze2d":
        arrays = to_d4rl_maze({k: v.astype(np.float64) if v.dtype.kind == "f" else v
                               for k, v in arrays.items()})
    for key in ("observations", "next_observations", "actions"):
        arrays[key] = arrays[key].astype(np.float32)
    for key in ("qpos", "qvel"):  # the states as a file would store them
        arrays[key] = arrays[key].astype(state_dtype).astype(np.float64)
    return Dataset(name=TASK[family], source=str(path), **arrays)


def replay(dataset: Dataset, rows: int, seed: int = 0) -> dict:
    sampled = consistency.sample_rows(dataset, rows, seed)
    on_bound = consistency.clip_bound_rows(dataset, sampled)
    used = sampled[~on_bound]
    out = {"rows_used": int(len(used)), "left_out": {"qvel_on_clip_bound": int(on_bound.sum())},
           "models": {}}
    for model in task_spec(dataset.name).models:
        errors, _mismatched = consistency.row_errors(dataset, used, model)
        out["models"][model] = [float(np.quantile(errors, q)) for q in QUANTILES]
    return out


def measure(args) -> dict:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    releases = {release_version(s): s for s in args.release}
    import mujoco
    releases.setdefault(mujoco.__version__, sys.executable)  # today's, recorded here too
    results = []
    for version, spec in sorted(releases.items(),
                                key=lambda kv: tuple(int(x) for x in
                                                     kv[0].split(".")[:3] if x.isdigit())):
        for family in args.families:
            if args.via_gymnasium:
                if family not in GYMNASIUM_V4:
                    continue
                env_id, model = GYMNASIUM_V4[family]
                todo = {f"{model} ({env_id})": {"xml": None, "right": model, "env": env_id}}
            else:
                todo = variants(family, workdir)
            for label, v in todo.items():
                start = time.perf_counter()
                stem = v["env"] if v.get("env") else Path(v["xml"]).stem
                path = workdir / f"{version}_{family}_{stem}.hdf5"
                record(spec, family, v["xml"], path, args.steps, args.seed,
                       gymnasium=v.get("env"))
                for dtype in ("float64", "float32"):
                    res = replay(read(path, family, np.dtype(dtype)), args.rows)
                    results.append({"release": version, "family": family, "recorded": label,
                                    "right_model": v["right"], "states": dtype, **res})
                print(f"{version} {family} {label}: "
                      + "; ".join(f"{r['states']} " + ", ".join(
                          f"{m} {q[2]:.2g}" for m, q in r["models"].items())
                          for r in results[-2:])
                      + f" ({time.perf_counter() - start:.1f} s)", flush=True)
    return {"today": mujoco.__version__, "steps": args.steps, "rows": args.rows,
            "quantiles": list(QUANTILES), "results": results}


# ---- the tables -----------------------------------------------------------------------------

def _q(qs) -> str:
    return " / ".join(f"{x:.1e}" for x in qs)


def markdown(data: dict) -> str:
    res = data["results"]
    lines = [f"Replayed in MuJoCo {data['today']}; {data['steps']} recorded rows per file, "
             f"{data['rows']} sampled; cells: median / 0.99 / 0.999 / max of the per-row "
             "max-abs next-observation error.", "",
             "**Release drift** (recorded and replayed in the same model):", "",
             "| release | family (model) | float64 states | float32 states |",
             "|---|---|---|---|"]
    for r64 in res:
        if r64["states"] != "float64" or r64["right_model"] is None:
            continue
        r32 = next(r for r in res if r["states"] == "float32" and r["release"] ==
                   r64["release"] and r["recorded"] == r64["recorded"]
                   and r["family"] == r64["family"])
        m = r64["right_model"]
        lines.append(f"| {r64['release']} | {r64['family']} ({m}) | {_q(r64['models'][m])} | "
                     f"{_q(r32['models'][m])} |")
    lines += ["", "**Model mismatch** (recorded in one model, replayed in another; float32 "
              "states):", "", "| release | family: recorded in | replayed in | errors |",
              "|---|---|---|---|"]
    for r in res:
        if r["states"] != "float32":
            continue
        for m, qs in r["models"].items():
            if m != r["right_model"]:
                lines.append(f"| {r['release']} | {r['family']}: {r['recorded']} | {m} | "
                             f"{_q(qs)} |")
    return "\n".join(lines) + "\n"


# The committed test data (tests/data/<release>/, tests/test_release_drift.py): name -> family,
# model label (variants()), as D4RL stores states (float32).
TEST_FILES = {"hopper-random.hdf5": ("hopper", "hopper.xml"),
              "walker2d-random-walker2d.hdf5": ("walker2d", "walker2d.xml"),
              "walker2d-random-walker2d_v5.hdf5": ("walker2d", "walker2d_v5.xml"),
              "halfcheetah-random.hdf5": ("halfcheetah", "half_cheetah.xml"),
              "hopper-random-wrong-foot-friction.hdf5": ("hopper",
                                                         "hopper.xml, foot friction 2.0->1.0")}


def test_data(args) -> None:
    """Small float32-state files recorded in the first `--release` (tests/data/README.md)."""
    if len(args.release) != 1:
        raise SystemExit("--test-data needs exactly one --release")
    out = Path(args.test_data)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for name, (family, label) in TEST_FILES.items():
        xml = variants(family, workdir)[label]["xml"]
        record(args.release[0], family, xml, out / name, args.steps, args.seed,
               state_dtype="float32")
        print(f"{out / name}: {family} in {label}, {(out / name).stat().st_size} bytes")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--release", action="append", default=[],
                   help="PYTHON[@PYTHONPATH] of a throwaway environment with an older mujoco")
    p.add_argument("--families", nargs="+", default=list(TASK), choices=list(TASK))
    p.add_argument("--steps", type=int, default=3000, help="rows recorded per file")
    p.add_argument("--rows", type=int, default=2000, help="rows replayed per file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", required=True, help="where the recorded files go")
    p.add_argument("--json", help="write every number here")
    p.add_argument("--markdown", help="write the tables here")
    p.add_argument("--via-gymnasium", action="store_true",
                   help="record through each release's own gymnasium v4 env (its own model; "
                        "the release's environment needs gymnasium, e.g. 0.29.1) instead of "
                        "record_release.py's own step: hopper, walker2d, halfcheetah")
    p.add_argument("--test-data", metavar="DIR",
                   help="instead: record the test files (TEST_FILES) in the one --release")
    args = p.parse_args(argv)
    if args.test_data:
        test_data(args)
        return 0
    data = measure(args)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
    text = markdown(data)
    if args.markdown:
        Path(args.markdown).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
