"""Work-around for snakemake-executor-plugin-slurm (2.8.0, the newest release): a job cancelled
with `scancel` has the sacct State 'CANCELLED by <uid>'; the plugin compares the whole string with
its failure states ('CANCELLED', ...), misses it and keeps waiting on the job as if it were
running: no retry, and Snakemake never ends. Found by tests/test_slurm.py.

`patch_cancelled_state()` wraps the plugin's status query so such jobs read 'CANCELLED' and are
retried like any failed job. The Snakefile calls it; it does nothing when the plugin is not
installed or has no such function (a later release may rename it)."""
from __future__ import annotations

import functools


def first_word(state: str) -> str:
    """'CANCELLED by 1000' -> 'CANCELLED'; SLURM's other job states are one word already."""
    return state.split(" ", 1)[0]


def patch_cancelled_state() -> bool:
    """Install the wrapper (once); True if the plugin's status query is now wrapped."""
    try:
        import snakemake_executor_plugin_slurm as plugin
    except ImportError:
        return False
    query = getattr(plugin, "query_job_status", None)
    if query is None:
        return False
    if getattr(query, "first_word_states", False):
        return True

    @functools.wraps(query)
    async def query_job_status(command, logger):
        states, seconds = await query(command, logger)
        if states:
            states = {job: first_word(state) for job, state in states.items()}
        return states, seconds

    query_job_status.first_word_states = True
    plugin.query_job_status = query_job_status
    return True
