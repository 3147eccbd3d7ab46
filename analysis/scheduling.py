"""Scheduling: the wall time of a priced plan, as a list schedule of its DAG on the profile's
parallelism.
"""
from __future__ import annotations

import heapq
import os
from pathlib import Path

from analysis.pricing import JobCost
from harness.config import ConfigError

def _deps(costs: list[JobCost]) -> list[list[int]]:
    """Indices of the jobs whose outputs each job reads (paths in the specs)."""
    producer: dict[str, int] = {}
    for i, c in enumerate(costs):
        spec = c.spec
        for p in [spec.get("out"), *(spec.get("outputs") or {}).values()]:
            if p:
                producer[str(p)] = i
    deps = []
    for c in costs:
        spec = c.spec
        inputs = [spec.get("dataset"), spec.get("policy_dir"),
                  *(spec.get("model_dirs") or {}).values(), *(spec.get("scores") or []),
                  *(spec.get("rollout_error") or [])]
        found = set()
        for p in filter(None, inputs):
            p = str(p)
            j = producer.get(p)
            if j is None:  # a file inside a job's out folder (rollout_error.csv, eval.json)
                j = next((producer[q] for q in (str(Path(p).parent),) if q in producer), None)
            if j is not None:
                found.add(j)
        deps.append(sorted(found))
    return deps


def schedule(costs: list[JobCost], slots: int, by_threads: bool) -> float:
    """Wall seconds of a list schedule: jobs start in DAG order as soon as their inputs exist
    and capacity is free. `by_threads`: a job takes its threads out of `slots` cores (local);
    else one of `slots` job slots (a cluster queue)."""
    deps = _deps(costs)
    need = [min(c.threads, slots) if by_threads else 1 for c in costs]
    left = [len(d) for d in deps]
    users: list[list[int]] = [[] for _ in costs]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    ready = [i for i, n in enumerate(left) if n == 0]
    running: list[tuple[float, int]] = []
    now, free = 0.0, slots
    done = 0
    while done < len(costs):
        ready.sort()
        started = []
        for i in ready:
            if need[i] <= free:
                free -= need[i]
                heapq.heappush(running, (now + costs[i].wall_seconds, i))
                started.append(i)
        ready = [i for i in ready if i not in set(started)]
        if not running:
            raise RuntimeError("estimate: the job graph has a cycle or a job larger than the "
                               "capacity")
        now, i = heapq.heappop(running)
        free += need[i]
        done += 1
        for u in users[i]:
            left[u] -= 1
            if left[u] == 0:
                ready.append(u)
    return now


def parallelism(profile: str | None, cores: int | None, jobs: int | None) -> tuple[int, bool]:
    """(slots, by_threads): --jobs N job slots (cluster), else the profile's `jobs` (slurm),
    else --cores (default: this machine's CPUs) shared by the jobs' threads (local)."""
    if jobs:
        return jobs, False
    if profile:
        prof = Path(__file__).resolve().parent.parent / "workflow" / "profiles" / profile \
            / "config.yaml"
        if not prof.exists():
            raise ConfigError(f"--profile {profile}: no {prof.relative_to(prof.parents[3])}")
        import yaml
        data = yaml.safe_load(prof.read_text()) or {}
        if "jobs" in data:
            return int(data["jobs"]), False
    return cores or os.cpu_count() or 1, True

