"""Kill anywhere, lose nothing (issue 17, item 3).

Every long step kind (dataset generation, ensemble, reward, diffusion, policy training of a
model-free, an ensemble-based and a DyDiff method, evaluation, the rollout-error study) is
SIGKILLed with Snakemake itself (the whole process group, as a crash, `kill -9` or a lost node
does) at a seeded random moment of its run; `snakemake` is then run again as README "Resuming"
says, and the job's outputs must equal those of the uninterrupted reference run (conftest's
tiny_dag): arrays and weights bit for bit, scores and tables exactly, wall-time entries and
the git sha excepted. A checkpoint that existed at the kill must be the one resumed from.

One trial: copy the reference results, delete everything the job writes (its checkpoints
too, so it starts from nothing as in the reference), start `snakemake <the job's outputs>` in
a working directory of its own, SIGKILL the session u x D seconds after the job's process
appears (u seeded; D = the job's measured duration: its step time in the reference job log
plus the measured start-up of a `dydiff-bench` process; a job that ran faster than in the
reference and had ended before its moment is run once more, with the duration it took), then
`snakemake --unlock` and the same command with `--rerun-incomplete`. A last trial kills a
policy job the moment its first output appears: written, but not yet recorded as complete by
Snakemake. Trials run two at a time (the CI machine has 2 cores); MLflow is off
(DYDIFF_MLFLOW=0): not what is tested here.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from dag_helpers import (BIN, TINY, assert_same_output, env_with_bin, kill_session,
                         session_processes, snakemake_in, step_seconds, wait_for_process)
from harness import plan
from harness.checkpoint import CHECKPOINT, METRICS, load_checkpoint

SEED = 17  # the kill moments (issue 17)
ENV = {"DYDIFF_MLFLOW": "0"}
pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(),
                                reason="finds a job's processes in /proc (Linux)")
# The newest checkpoint and the one kept before it (harness.checkpoint).
CHECKPOINTS = f"{Path(CHECKPOINT).stem}*{Path(CHECKPOINT).suffix}"


@dataclass(frozen=True)
class Trial:
    name: str
    step: str
    coords: dict = field(default_factory=dict)
    at_first_output: bool = False  # kill when an output appears, not at a random moment


# Ten seeded kills over the kinds (DyDiff, the method under study, twice: one per agent),
# longest first so that two workers finish together; then the deterministic edge case.
TRIALS = [
    Trial("datasets", "generate-datasets", {"family": "hopper"}),
    Trial("datasets-maze2d", "generate-datasets", {"family": "maze2d"}),
    Trial("diffusion", "train-model", {"model": "diffusion"}),
    Trial("policy-dydiff-cql", "train-policy", {"method": "dydiff-cql"}),
    Trial("policy-mopo", "train-policy", {"method": "mopo"}),
    Trial("policy-dydiff-td3bc", "train-policy", {"method": "dydiff-td3bc"}),
    Trial("rollout-error", "rollout-error"),
    Trial("reward", "train-model", {"model": "reward"}),
    Trial("policy-cql", "train-policy", {"method": "cql"}),
    Trial("ensemble", "train-model", {"model": "ensemble"}),
    Trial("evaluate-mbpo", "evaluate", {"method": "mbpo"}),
    Trial("policy-td3bc-output-written", "train-policy", {"method": "td3bc"},
          at_first_output=True),
]


@dataclass
class JobFiles:
    outputs: list[Path]      # the rule's outputs: the snakemake target
    compare: list[Path]      # what must equal the reference (outputs + metrics tables)
    clear: list[Path]        # deleted before the trial: everything the job writes
    log: Path                # the job's log (Snakemake rewrites it at each run)
    checkpoints: list[Path]  # glob patterns of its checkpoints (none: a step without)


def job_spec(cfg: dict, trial: Trial) -> dict:
    """The trial's job among every job of the grid (harness.plan), on the grid's first task
    (hopper-medium-replay) unless the trial names another."""
    coords = {"task": cfg["tasks"][0], **trial.coords}
    found = [s for s in plan.all_jobs(cfg) if s["step"] == trial.step
             and all(s.get(k) == v for k, v in coords.items() if k in s)]
    assert len(found) == 1, f"{trial.name}: {len(found)} jobs match"
    return found[0]


def job_files(cfg: dict, trial: Trial) -> JobFiles:
    """The files of the trial's job under cfg's results folder (paths from harness.plan)."""
    spec = job_spec(cfg, trial)
    # Every wildcard the job's paths can have, from its spec (a model's seed is its own).
    wc = {k: spec.get(k) for k in ("task", "method", "model", "family", "seed")}
    wc["mseed"] = spec.get("seed")
    path = lambda kind: plan.path(cfg, kind, **wc)  # noqa: E731
    out = Path(spec["out"])
    if trial.step == "generate-datasets":
        outputs = [Path(p) for p in spec["outputs"].values()]
        return JobFiles(outputs, outputs, outputs + [out], path("log_generate"),
                        [out / ".sac" / "*.pt"])  # the online SAC run's checkpoints
    if trial.step == "train-model":
        return JobFiles([path("model")], [path("model"), out / METRICS], [out],
                        path("log_model"), [out / CHECKPOINTS])
    if trial.step == "train-policy":
        outputs = [path("final"), path("policy")]
        return JobFiles(outputs, outputs + [out / METRICS], [out], path("log_policy"),
                        [out / CHECKPOINTS])
    if trial.step == "evaluate":
        return JobFiles([out], [out], [out, out.with_suffix(".mlflow_run_id")],
                        path("log_evaluate"), [])
    assert trial.step == "rollout-error"
    outputs = [path("rollout_error_csv"), path("rollout_error_png"),
               path("rollout_error_at_h_png")]
    return JobFiles(outputs, outputs[:1], [out], path("log_rollout_error"), [])


def checkpoint_counts(files: JobFiles) -> dict[str, int]:
    """{file name: the count it was saved at} of the job's readable checkpoints now."""
    found = {}
    for pattern in files.checkpoints:
        for path in sorted(pattern.parent.glob(pattern.name)):
            try:
                found[path.name] = int(load_checkpoint(path)["at"])
            except Exception:  # an unreadable one is not resumed from, so it promises nothing
                continue
    return found


RESUMED = re.compile(r"resuming (\S+) from \D*(\d+)")


def measure_startup(cfg: dict, tmp: Path) -> float:
    """Seconds a `dydiff-bench` step process takes before its step starts: one evaluation
    of the reference's td3bc policy, wall time minus the step time it logs."""
    spec = job_spec(cfg, Trial("startup", "evaluate", {"method": "td3bc"}))
    spec = plan.with_context(cfg, {**spec, "out": str(tmp / "eval.json")})
    t0 = time.monotonic()
    res = subprocess.run([str(BIN / "dydiff-bench"), "evaluate", "--threads", "1", "--job",
                          json.dumps(spec)], env=env_with_bin(ENV), capture_output=True,
                         text=True, timeout=300)
    wall = time.monotonic() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    (tmp / "startup.log").write_text(res.stderr)
    return max(wall - step_seconds(tmp / "startup.log"), 0.0)


def start_and_kill(trial: Trial, files: JobFiles, cmd: list[str], log: Path,
                   at: float | None) -> dict:
    """Run `cmd` (Snakemake making the job's outputs) in a session of its own and SIGKILL the
    session `at` seconds after the job's process appears (None: when an output appears)."""
    fragment = f"dydiff-bench {trial.step}"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env_with_bin(ENV), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_for_process(proc.pid, fragment, proc=proc), \
            f"the job never started:\n{log.read_text()[-3000:]}"
        t0 = time.monotonic()
        deadline, ended, polls = t0 + (600 if at is None else at), None, 0
        while time.monotonic() < deadline and proc.poll() is None:
            if at is None and any(p.exists() for p in files.outputs):
                break
            polls += 1
            if ended is None and polls % 10 == 0 and not any(
                    fragment in c for c in session_processes(proc.pid).values()):
                ended = time.monotonic() - t0  # the job's own run time, to within ~50 ms
            time.sleep(0.005)
        running = session_processes(proc.pid)
        return {"killed_after_s": time.monotonic() - t0, "job_ended_after_s": ended,
                "job_running": any(fragment in c for c in running.values()),
                "snakemake_running": proc.pid in running}
    finally:
        kill_session(proc.pid)
        proc.wait()


def run_trial(index: int, trial: Trial, reference: Path, work: Path, startup: float) -> dict:
    """Copy, delete, start, kill, rerun; returns what happened (compared by the test)."""
    results = work / "results"
    shutil.copytree(reference / "tiny", results / "tiny", symlinks=True)  # keeps mtimes
    cfg = plan.load_config(TINY, {"results_dir": str(results)})
    ref_cfg = plan.load_config(TINY, {"results_dir": str(reference)})
    files = job_files(cfg, trial)
    base = snakemake_in(work, "--cores", "1", "--configfile", str(TINY), "--config",
                        f"results_dir={results}")
    target = ["--", *map(str, files.outputs)]
    duration = startup + step_seconds(job_files(ref_cfg, trial).log)
    u = float(np.random.default_rng([SEED, index]).uniform())
    rec = {"trial": trial.name, "u": u, "commands": [
        " ".join(base + target), "kill -9 -<its process group>",
        " ".join(base + ["--unlock"] + target),
        " ".join(base + ["--rerun-incomplete"] + target)]}
    for attempt in (1, 2):
        for path in files.clear:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        rec.update(attempt=attempt, duration_s=duration, **start_and_kill(
            trial, files, base + target, work / f"first-{attempt}.log",
            None if trial.at_first_output else u * duration))
        if rec["job_running"] or attempt == 2:
            break
        # The job ran faster than in the reference and had ended before its kill: once more,
        # with the duration it took here.
        duration = rec["job_ended_after_s"] or rec["killed_after_s"]
    rec.update(outputs_at_kill=[p.name for p in files.outputs if p.exists()],
               checkpoints_at_kill=checkpoint_counts(files))

    env = env_with_bin(ENV)
    unlock = subprocess.run(base + ["--unlock"] + target, env=env, capture_output=True,
                            text=True, timeout=300)
    rerun = subprocess.run(base + ["--rerun-incomplete"] + target, env=env,
                           capture_output=True, text=True, timeout=900)
    rec.update(unlock_rc=unlock.returncode, rerun_rc=rerun.returncode,
               rerun_ran_job="Nothing to be done" not in rerun.stdout + rerun.stderr,
               rerun_tail=(rerun.stdout + rerun.stderr)[-3000:],
               job_log=files.log.read_text(errors="replace") if files.log.exists() else "",
               results=results)
    return rec


@pytest.fixture(scope="module")
def kill_trials(tiny_dag, tmp_path_factory):
    """Every trial run (two at a time): {trial name: record}."""
    reference, cfg = tiny_dag
    root = tmp_path_factory.mktemp("kill")
    startup = measure_startup(cfg, root)
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {t.name: pool.submit(run_trial, i, t, reference, root / t.name, startup)
                   for i, t in enumerate(TRIALS)}
    records = {}
    for name, fut in futures.items():
        try:
            records[name] = fut.result()
        except Exception as err:  # reported by that trial's test, not by the fixture
            records[name] = {"trial": name, "error": f"{type(err).__name__}: {err}"}
    print(f"\n{len(TRIALS)} kill trials in {time.monotonic() - t0:.0f} s "
          f"(start-up of a step process: {startup:.1f} s)")
    return records


@pytest.mark.parametrize("trial", TRIALS, ids=[t.name for t in TRIALS])
def test_killed_job_reruns_to_the_uninterrupted_outputs(trial, kill_trials, tiny_dag):
    rec = kill_trials[trial.name]
    assert "error" not in rec, rec.get("error")
    print(f"{trial.name}: killed {rec['killed_after_s']:.2f} s after the job started "
          f"(u={rec['u']:.3f} of {rec['duration_s']:.1f} s, attempt {rec['attempt']}); "
          f"job running: {rec['job_running']}, snakemake running: {rec['snakemake_running']}; "
          f"outputs then: {rec['outputs_at_kill']}; checkpoints then: "
          f"{rec['checkpoints_at_kill']}")
    print("  " + "\n  ".join(rec["commands"]))
    assert rec["unlock_rc"] == 0
    assert rec["rerun_rc"] == 0, rec["rerun_tail"] + "\n== job log\n" + rec["job_log"][-3000:]
    reference, _ = tiny_dag
    ref = job_files(plan.load_config(TINY, {"results_dir": str(reference)}), trial)
    got = job_files(plan.load_config(TINY, {"results_dir": str(rec["results"])}), trial)
    for a, b in zip(ref.compare, got.compare):
        assert_same_output(a, b)
    if rec["checkpoints_at_kill"] and rec["rerun_ran_job"]:
        # Lose nothing: the rerun went on from the newest checkpoint, not from the start.
        resumed = RESUMED.findall(rec["job_log"])
        assert resumed, f"the rerun started over:\n{rec['job_log'][-3000:]}"
        assert int(resumed[-1][1]) == max(rec["checkpoints_at_kill"].values()), resumed
    if trial.at_first_output:
        assert rec["outputs_at_kill"], "the kill came before any output was written"
