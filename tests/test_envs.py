"""Task registry, D4RL normalisation, termination functions and state restore vs the simulator."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from datagen.generate import random_dataset
from harness.envs import (TASKS, family_of, make_env, normalized_score, restore_state,
                         task_spec, termination_fn)

FAMILIES = ("hopper", "walker2d", "halfcheetah")


@pytest.fixture(scope="module")
def random_data():
    """1500 random transitions per family (different seed from the shared fixture)."""
    return {fam: random_dataset(fam, 1500, seed=1) for fam in FAMILIES}


@pytest.mark.parametrize("name", ["hopper-medium-v2", "mujoco/walker2d/expert-v0",
                                  "halfcheetah-medium-replay"])
def test_normalized_score_exact_at_reference_returns(name):
    spec = task_spec(name)
    assert normalized_score(name, spec.ref_min_score) == pytest.approx(0.0, abs=1e-12)
    assert normalized_score(name, spec.ref_max_score) == pytest.approx(100.0, abs=1e-12)
    mid = (spec.ref_min_score + spec.ref_max_score) / 2
    np.testing.assert_allclose(normalized_score(name, [mid, spec.ref_max_score]), [50.0, 100.0])


def test_d4rl_reference_scores_are_d4rl_values():
    # d4rl/infos.py REF_MIN_SCORE / REF_MAX_SCORE (hopper-medium-v2: -20.272305 / 3234.3).
    assert normalized_score("hopper-medium-v2", 3234.3 / 2) == pytest.approx(
        100 * (1617.15 + 20.272305) / (3234.3 + 20.272305))
    assert (TASKS["halfcheetah"].ref_min_score, TASKS["halfcheetah"].ref_max_score) == (
        -280.178953, 12135.0)
    assert (TASKS["walker2d"].ref_min_score, TASKS["walker2d"].ref_max_score) == (
        1.629008, 4592.3)


@pytest.mark.parametrize("name,family", [("hopper-medium-replay-v2", "hopper"),
                                         ("mujoco/halfcheetah/medium-v0", "halfcheetah"),
                                         ("Walker2d-expert", "walker2d")])
def test_family_of(name, family):
    assert family_of(name) == family


def test_unknown_task_lists_known_families():
    with pytest.raises(KeyError) as err:
        family_of("ant-medium-v2")
    msg = str(err.value)
    assert "ant-medium-v2" in msg and all(f in msg for f in FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_termination_fn_matches_simulator(random_data, family):
    data = random_data[family]
    done = termination_fn(family)(data.next_observations)
    np.testing.assert_array_equal(done, data.terminals)
    # Same function on torch tensors (used on model rollouts).
    done_t = termination_fn(family)(torch.as_tensor(data.next_observations))
    np.testing.assert_array_equal(done_t.numpy(), data.terminals)
    if family == "halfcheetah":
        assert not data.terminals.any()
    else:  # random hoppers/walkers fall within a few dozen steps
        assert data.terminals.sum() > 10


def test_termination_fn_flags_non_finite_states():
    obs = np.zeros((2, 17), np.float32)
    obs[:, 0] = 1.25  # healthy walker height
    obs[1, 5] = np.nan
    np.testing.assert_array_equal(termination_fn("walker2d")(obs), [False, True])
    np.testing.assert_array_equal(termination_fn("halfcheetah")(obs), [False, True])


@pytest.mark.parametrize("family", FAMILIES)
def test_restore_state_reproduces_observation_and_next_observation(random_data, family):
    data = random_data[family]
    env = make_env(family, seed=123)
    rows = np.arange(0, len(data), 97)
    for i in rows:
        obs = restore_state(env, data.qpos[i], data.qvel[i])
        np.testing.assert_allclose(obs, data.observations[i], atol=1e-5)
        next_obs = env.step(data.actions[i])[0]
        np.testing.assert_allclose(next_obs, data.next_observations[i], atol=1e-5)
    env.close()


def test_make_env_has_d4rl_layout_and_time_limit():
    for family in FAMILIES:
        env = make_env(family, seed=0)
        spec = task_spec(family)
        assert env.observation_space.shape == (spec.obs_dim,)
        assert env.action_space.shape == (spec.act_dim,)
        assert env.spec.max_episode_steps == 1000
        env.close()
