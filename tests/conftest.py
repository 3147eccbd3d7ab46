"""Shared fixtures (small and additive: several test files use them)."""
from __future__ import annotations

import pytest
import torch

from harness import runtime

torch.set_num_threads(1)  # the test machine's cores are shared
# The suite's bit-exact tests are CPU ones: on a GPU machine too (GPU checks say so and skip
# without one); jobs the tests run as subprocesses get their device from their spec.
runtime.use_device("cpu", deterministic=True)


@pytest.fixture(scope="session")
def hopper_random():
    """3000 uniformly random Hopper-v5 transitions (D4RL layout with qpos/qvel), seed 0."""
    from datagen.generate import random_dataset
    return random_dataset("hopper", 3000, seed=0)


@pytest.fixture(scope="session")
def tiny_dag(tmp_path_factory):
    """The tiny grid (tests/configs/tiny.yaml) run once, uninterrupted, from the repository
    root: (results folder, resolved config). The reference the DAG tests compare with (the
    workflow, kill and disk-full tests); a test copies it before changing anything in it."""
    from dag_helpers import run_tiny_dag
    results = tmp_path_factory.mktemp("tiny_results")
    return results, run_tiny_dag(results)


@pytest.fixture(scope="session")
def bad_data(tmp_path_factory):
    """{case: path} of the look-right-but-are-not D4RL files (tests/bad_data.py), made once."""
    from bad_data import write_cases
    return write_cases(tmp_path_factory.mktemp("bad_data"))
