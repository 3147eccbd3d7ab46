"""Disk full (issue 17, item 6): a job that hits ENOSPC leaves nothing that Snakemake or a
resumed step would trust, and the rerun once space is freed ends with the numbers of the
uninterrupted reference run (conftest's tiny_dag).

- For real (root on Linux, as CI): the output folder of a policy job is a small tmpfs, filled
  so that one checkpoint fits and the next does not. Elsewhere it is skipped with the reason.
- Simulated (everywhere): fsync fails with ENOSPC, as it does on filesystems that allocate
  late (NFS, ext4 delalloc), for each kind of atomic write the steps use.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch

from dag_helpers import (TINY, assert_same_output, env_with_bin, leave_free, mounted_tmpfs,
                         snakemake_in)
from harness import plan
from harness.checkpoint import (CHECKPOINT, METRICS, atomic_path, atomic_write_text,
                                load_checkpoint, save_checkpoint)

TASK, METHOD = "hopper-medium-replay", "td3bc"


def test_policy_job_on_a_full_disk_leaves_nothing_trusted_and_reruns_identically(
        tiny_dag, tmp_path):
    reference, ref_cfg = tiny_dag
    results = tmp_path / "results"
    shutil.copytree(reference / "tiny", results / "tiny", symlinks=True)  # keeps mtimes
    cfg = plan.load_config(TINY, {"results_dir": str(results)})
    where = {"method": METHOD, "task": TASK, "seed": cfg["seeds"][0]}
    ref_dir, out = (plan.path(c, "policy_dir", **where) for c in (ref_cfg, cfg))
    shutil.rmtree(out)  # the job starts from nothing, on the tmpfs mounted there
    checkpoint_size = (ref_dir / CHECKPOINT).stat().st_size
    outputs = [plan.path(cfg, k, **where) for k in ("final", "policy")]
    base = snakemake_in(tmp_path, "--cores", "1", "--configfile", str(TINY), "--config",
                        f"results_dir={results}")
    target = ["--", *map(str, outputs)]
    env = env_with_bin({"DYDIFF_MLFLOW": "0"})
    log = plan.path(cfg, "log_policy", **where)

    with mounted_tmpfs(out, 32 * checkpoint_size):
        # Room for the first checkpoint (and the metrics table), not for a second one beside
        # it: the disk fills up mid-run, after something worth resuming from was saved.
        filler = leave_free(out, checkpoint_size * 3 // 2)
        # --keep-incomplete: what is left is the step's doing, not Snakemake's cleanup.
        full = subprocess.run(base + ["--keep-incomplete"] + target, env=env,
                              capture_output=True, text=True, timeout=900)
        assert full.returncode != 0, "the job did not fail on a full disk"
        # A clear message: the error and the file that did not fit, in the job's log.
        assert re.search(rf"No space left on device: '{re.escape(str(out))}/[^']+'",
                         log.read_text()), log.read_text()[-3000:]
        left = sorted(p.name for p in out.iterdir() if p != filler)
        assert not [p for p in outputs if p.exists()], f"outputs left on a full disk: {left}"
        assert not [n for n in left if n.endswith(".tmp")], f"temporary files left: {left}"
        saved = load_checkpoint(out / CHECKPOINT)  # whole and readable, not half-written
        total = cfg["policy"]["offline"]["total_steps"]
        assert 0 < saved["at"] < total, f"the disk did not fill up mid-run: {saved['at']}"
        assert pd.read_parquet(out / METRICS)["step"].max() >= saved["at"]

        filler.unlink()  # space freed: the same command again
        rerun = subprocess.run(base + target, env=env, capture_output=True, text=True,
                               timeout=900)
        assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
        assert f"from step {saved['at']}" in log.read_text(), log.read_text()[-3000:]
        for name in (plan.path(cfg, "final", **where).name, plan.path(cfg, "policy", **where).name,
                     METRICS):
            assert_same_output(ref_dir / name, out / name)


# ---- simulated: fsync reports the full disk --------------------------------------------------

def _write_hdf5(path, value):
    from harness.data.d4rl import write_hdf5
    from datagen.generate import random_dataset
    ds = random_dataset("hopper", 20, seed=value)
    write_hdf5(ds, path, value=value)


def _read_hdf5(path):
    import h5py
    with h5py.File(path, "r") as f:
        return int(f.attrs["value"])


def _write_parquet(path, value):
    with atomic_path(path) as tmp:
        pd.DataFrame({"x": np.full(4, value)}).to_parquet(tmp)


WRITERS = {  # kind: (file name, write(path, value), read(path) -> value)
    "text": ("final.json", lambda p, v: atomic_write_text(p, json.dumps({"v": v})),
             lambda p: json.loads(p.read_text())["v"]),
    "checkpoint": (CHECKPOINT, lambda p, v: save_checkpoint(p, {"v": torch.tensor(v)}),
                   lambda p: int(load_checkpoint(p)["v"])),
    "parquet": (METRICS, _write_parquet, lambda p: int(pd.read_parquet(p)["x"].iloc[0])),
    "hdf5": ("hopper-random.hdf5", _write_hdf5, _read_hdf5),
}


@pytest.mark.parametrize("kind", list(WRITERS))
def test_enospc_at_fsync_keeps_the_previous_file_and_leaves_no_temp(kind, tmp_path,
                                                                   monkeypatch):
    name, write, read = WRITERS[kind]
    path = tmp_path / name

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:  # a first write on a full disk: no file at all
        m.setattr(os, "fsync", full)
        with pytest.raises(OSError) as err:
            write(path, 1)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert list(tmp_path.iterdir()) == []

    write(path, 1)
    with monkeypatch.context() as m:  # a rewrite on a full disk: the previous file stays
        m.setattr(os, "fsync", full)
        with pytest.raises(OSError):
            write(path, 2)
    assert read(path) == 1
    assert [p.name for p in tmp_path.iterdir()] == [name]
    write(path, 2)  # space freed
    assert read(path) == 2
