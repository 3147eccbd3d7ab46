"""TD3+BC and CQL: loss pieces against hand computation, shapes, delayed updates, exact state."""
import io
import math

import numpy as np
import pytest
import torch

from harness.config import ConfigError, from_dict
from agents.cql import CQL, CQLConfig
from agents.sac import SAC, SACConfig
from agents.td3bc import TD3BC, TD3BCConfig, smoothed_target_action, td3bc_actor_loss

torch.set_num_threads(1)
O, A, B = 5, 3, 8


def batch(b=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"obs": torch.randn(b, O, generator=g) * 3 + 1,
            "actions": torch.rand(b, A, generator=g) * 2 - 1,
            "rewards": torch.randn(b, generator=g),
            "next_obs": torch.randn(b, O, generator=g) * 3 + 1,
            "terminals": (torch.rand(b, generator=g) < 0.2).float()}


def test_td3bc_actor_loss_matches_hand_computation():
    q = torch.tensor([2.0, -4.0, 6.0])
    pi = torch.tensor([[0.5, 0.0], [0.1, -0.2], [1.0, 1.0]])
    a = torch.tensor([[0.0, 0.0], [0.1, 0.2], [0.0, 1.0]])
    loss, lmbda = td3bc_actor_loss(q, pi, a, alpha=2.5)
    lam = 2.5 / ((2 + 4 + 6) / 3)                         # alpha / mean|Q| = 0.625
    bc = (0.25 + 0 + 0 + 0.16 + 1 + 0) / 6                # mean over all action entries
    assert lmbda.item() == pytest.approx(lam)
    assert loss.item() == pytest.approx(-lam * (2 - 4 + 6) / 3 + bc)


def test_td3bc_lambda_is_not_differentiated():
    q = torch.tensor([1.0, 3.0], requires_grad=True)
    pi = torch.zeros(2, 1)
    loss, _ = td3bc_actor_loss(q, pi, torch.zeros(2, 1), alpha=2.5)
    loss.backward()
    # d/dq of -lambda * mean(q) with lambda held constant: -lambda / n for each entry.
    assert torch.allclose(q.grad, torch.full((2,), -(2.5 / 2.0) / 2))


def test_target_policy_smoothing_clips_noise_and_action():
    cfg = TD3BCConfig()
    target = torch.tensor([[0.0, 0.9, -0.9, 0.2]])
    noise = torch.tensor([[2.0, 0.3, -0.05, -0.6]])
    out = smoothed_target_action(target, noise, cfg)
    # noise clipped to +-0.5 first, then the action to +-1.
    assert torch.allclose(out, torch.tensor([[0.5, 1.0, -0.95, -0.3]]))


def test_td3bc_normalises_raw_observations_with_dataset_stats():
    obs = np.random.default_rng(0).normal(3.0, 2.0, size=(500, O)).astype(np.float32)
    agent = TD3BC(O, A, TD3BCConfig(hidden=[16, 16]))
    agent.set_obs_stats(obs)
    assert np.allclose(agent.normalizer.mean.numpy(), obs.mean(0), atol=1e-5)
    assert np.allclose(agent.normalizer.std.numpy(), obs.std(0) + 1e-3, atol=1e-5)
    x = torch.as_tensor(obs[:4])
    manual = agent.actor((x - torch.as_tensor(obs.mean(0))) / torch.as_tensor(obs.std(0) + 1e-3))
    assert torch.allclose(agent.act(x), manual, atol=1e-5)


def test_td3bc_actor_and_targets_update_every_second_step():
    torch.manual_seed(0)
    agent = TD3BC(O, A, TD3BCConfig(hidden=[16, 16]))
    actor0 = [p.clone() for p in agent.actor.parameters()]
    target0 = [p.clone() for p in agent.critic_target.parameters()]
    critic0 = [p.clone() for p in agent.critic.parameters()]
    info = agent.update(batch())
    assert "actor_loss" not in info
    assert all(torch.equal(a, b) for a, b in zip(actor0, agent.actor.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(target0, agent.critic_target.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(critic0, agent.critic.parameters()))
    info = agent.update(batch(seed=1))
    assert "actor_loss" in info and "lmbda" in info
    assert not all(torch.equal(a, b) for a, b in zip(actor0, agent.actor.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(target0, agent.critic_target.parameters()))


def test_cql_conservative_gap_matches_hand_computation():
    torch.manual_seed(0)
    cfg = CQLConfig(hidden=[16, 16], num_repeat_actions=4, temperature=2.0)
    agent = CQL(O, A, cfg)
    b = batch(b=3)
    q_data = agent.critic(b["obs"], b["actions"])
    samples = agent.sample_cql_actions(b["obs"], b["next_obs"])
    gap = agent.conservative_gap(q_data, samples)
    n, t = cfg.num_repeat_actions, cfg.temperature
    with torch.no_grad():
        for c, qnet in enumerate((agent.critic.q1, agent.critic.q2)):
            lse = []
            for i in range(3):
                s = b["obs"][i]
                terms = []
                for j in range(n):
                    k = i * n + j
                    for act, logp in ((samples["rand"][k], A * math.log(0.5)),
                                      (samples["pi"][k], samples["logp_pi"][k].item()),
                                      (samples["next_pi"][k], samples["logp_next_pi"][k].item())):
                        terms.append((qnet(torch.cat([s, act])).item() - logp) / t)
                lse.append(t * math.log(sum(math.exp(x) for x in terms)))
            want = np.mean(lse) - q_data[c].mean().item()
            assert gap[c].item() == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_cql_samples_each_proposal_at_the_right_states():
    torch.manual_seed(0)
    agent = CQL(O, A, CQLConfig(hidden=[16, 16], num_repeat_actions=10))
    b = batch()
    s = agent.sample_cql_actions(b["obs"], b["next_obs"])
    assert s["rand"].shape == (B * 10, A) and s["pi"].shape == (B * 10, A)
    assert torch.equal(s["obs_rep"][:10], b["obs"][0].expand(10, O))
    assert s["rand"].abs().max() <= 1 and s["rand"].std() > 0.3
    assert torch.allclose(s["logp_rand"], torch.full((B * 10,), A * math.log(0.5)))


def test_cql_update_penalises_and_lagrange_moves_alpha_prime():
    torch.manual_seed(0)
    agent = CQL(O, A, CQLConfig(hidden=[16, 16]))
    info = agent.update(batch())
    assert {"critic_loss", "cql_loss", "actor_loss", "alpha", "q_mean"} <= set(info)
    assert "cql_alpha" not in info
    lag = CQL(O, A, CQLConfig(hidden=[16, 16], with_lagrange=True, lagrange_threshold=10.0))
    before = lag.cql_log_alpha.item()
    info = lag.update(batch())
    assert info["cql_alpha"] == pytest.approx(1.0) and lag.cql_log_alpha.item() != before


@pytest.mark.parametrize("make", [
    lambda: TD3BC(O, A, TD3BCConfig(hidden=[16, 16])),
    lambda: CQL(O, A, CQLConfig(hidden=[16, 16])),
    lambda: SAC(O, A, SACConfig(hidden=[16, 16])),
])
def test_agent_shapes_and_exact_state_roundtrip(make):
    torch.manual_seed(0)
    agent = make()
    obs = torch.randn(7, O)
    for det in (True, False):
        act = agent.act(obs, deterministic=det)
        assert act.shape == (7, A) and act.abs().max() <= 1.0
    for i in range(3):
        info = agent.update(batch(seed=i))
        assert all(math.isfinite(v) for v in info.values())
    buf = io.BytesIO()  # through bytes, as a checkpoint does (no shared optimiser tensors)
    torch.save(agent.training_state(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=False)
    clone = make()
    clone.load_training_state(state)
    torch.manual_seed(5)
    a = agent.update(batch(seed=9))
    torch.manual_seed(5)
    b = clone.update(batch(seed=9))
    assert a == b
    assert all(torch.equal(p, q) for p, q in zip(agent.parameters(), clone.parameters()))


def test_configs_reject_bad_values_naming_the_key():
    with pytest.raises(ConfigError, match="td3bc.policy_freq"):
        from_dict(TD3BCConfig, {"policy_freq": 0}, where="td3bc")
    with pytest.raises(ConfigError, match="cql.temperature"):
        from_dict(CQLConfig, {"temperature": -1.0}, where="cql")
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(CQLConfig, {"cql_wieght": 1.0}, where="cql")
    assert from_dict(CQLConfig, {"cql_weight": 10.0}).cql_weight == 10.0
