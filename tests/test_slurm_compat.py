"""The work-around for the SLURM executor's 'CANCELLED by <uid>' state (workflow/slurm_compat.py)."""
import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))  # as the Snakefile
import slurm_compat  # noqa: E402


def test_first_word_of_sacct_states():
    assert slurm_compat.first_word("CANCELLED by 0") == "CANCELLED"
    assert slurm_compat.first_word("CANCELLED") == "CANCELLED"
    assert slurm_compat.first_word("OUT_OF_MEMORY") == "OUT_OF_MEMORY"


def test_patch_makes_the_plugin_see_cancelled_jobs(monkeypatch):
    plugin = pytest.importorskip("snakemake_executor_plugin_slurm")

    async def fake_query(command, logger):  # what the plugin parses from `sacct --parsable2`
        return {"7": "CANCELLED by 1000", "8": "COMPLETED", "9": "RUNNING"}, 0.01

    monkeypatch.setattr(plugin, "query_job_status", fake_query)
    assert slurm_compat.patch_cancelled_state()
    assert slurm_compat.patch_cancelled_state()  # a second call does not wrap twice
    states, seconds = asyncio.run(plugin.query_job_status("sacct ...", None))
    assert states == {"7": "CANCELLED", "8": "COMPLETED", "9": "RUNNING"} and seconds == 0.01
    # A failed query stays a failed query: (None, None) for the plugin to retry.
    monkeypatch.setattr(plugin, "query_job_status", lambda *a: _none())
    slurm_compat.patch_cancelled_state()
    assert asyncio.run(plugin.query_job_status("sacct ...", None)) == (None, None)


async def _none():
    return None, None
