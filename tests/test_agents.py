"""TD3+BC and CQL: loss pieces against hand computation, shapes, delayed updates, exact state;
the DyDiff authors' options (stochastic TD3+BC actor, no target smoothing, BC weight, CQL
observation standardisation, log-alpha clamp, update order, EDM init)."""
import io
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from harness.config import ConfigError, from_dict
from harness.registry import CQL_PRESETS
from agents.cql import CQL, CQLConfig, return_range
from agents.sac import SAC, SACConfig, TanhGaussianActor
from agents.td3bc import TD3BC, TD3BCConfig, smoothed_target_action, td3bc_actor_loss
from harness.training.policy import load_policy, save_policy

torch.set_num_threads(1)
O, A, B = 5, 3, 8


def fake_dataset(n=400, seed=0):
    """What `from_dataset` reads: dimensions and the real observations."""
    obs = np.random.default_rng(seed).normal(3.0, 2.0, size=(n, O)).astype(np.float32)
    return SimpleNamespace(obs_dim=O, act_dim=A, observations=obs)


AUTHORS_TD3BC = dict(actor="tanh_gaussian", target_smoothing=False, bc_weight=0.5,
                     obs_std_eps=1e-6, weight_init="edm")
AUTHORS_CQL = dict(actor_lr=3e-5, critic_lr=3e-4, alpha_lr=3e-5, cql_weight=10.0,
                   normalize_obs=True, obs_std_eps=1e-6, log_alpha_clamp=[-10.0, 0.5],
                   alpha_before_actor=True, log_std_min=-20.0, weight_init="edm")


# OfflineRL-Kit's MOPO SAC (config/paper.yaml policy.sac), with a short cosine horizon.
OKIT_SAC = dict(alpha=1.0, alpha_max=1.0, actor_lr_schedule="cosine", actor_lr_schedule_steps=10,
                actor_lr_schedule_every=2)


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
    # CORL starts log(alpha') at 1: the first update's penalty weight is e, not 1
    corl = CQL(O, A, CQLConfig(hidden=[16, 16], with_lagrange=True, cql_log_alpha_init=1.0))
    assert corl.update(batch())["cql_alpha"] == pytest.approx(math.e)


@pytest.mark.parametrize("make", [
    lambda: TD3BC(O, A, TD3BCConfig(hidden=[16, 16])),
    lambda: CQL(O, A, CQLConfig(hidden=[16, 16])),
    lambda: SAC(O, A, SACConfig(hidden=[16, 16])),
    lambda: TD3BC.from_dataset(fake_dataset(), TD3BCConfig(hidden=[16, 16], **AUTHORS_TD3BC)),
    lambda: CQL.from_dataset(fake_dataset(), CQLConfig(hidden=[16, 16], **AUTHORS_CQL)),
    lambda: SAC(O, A, SACConfig(hidden=[16, 16], **OKIT_SAC)),
    lambda: CQL.from_dataset(fake_dataset(), CQLConfig(**{**CQL_PRESETS["corl"],
                                                          "hidden": [16, 16]})),
], ids=["td3bc", "cql", "sac", "td3bc-authors", "cql-authors", "sac-offlinerl-kit", "cql-corl"])
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
    state = torch.load(buf, weights_only=True)
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


# ---- the DyDiff authors' TD3+BC variant (rlkit/algo/td3_bc.py) ------------------------------

def test_td3bc_tanh_gaussian_actor_samples_in_training_and_is_deterministic_in_act():
    torch.manual_seed(0)
    agent = TD3BC.from_dataset(fake_dataset(), TD3BCConfig(hidden=[16, 16],
                                                            actor="tanh_gaussian"))
    assert isinstance(agent.actor, TanhGaussianActor)
    assert isinstance(agent.actor_target, TanhGaussianActor)
    x = batch()["obs"]
    s = agent.normalizer(x)
    # Evaluation action: tanh(mean) of the standardised observation, the same every call.
    mu = agent.actor.net(s).chunk(2, dim=-1)[0]
    assert torch.equal(agent.act(x), agent.act(x))
    assert torch.allclose(agent.act(x, deterministic=True), torch.tanh(mu), atol=1e-6)
    assert not torch.allclose(agent.act(x, deterministic=False), agent.act(x))
    # Training action: a reparameterised sample tanh(mu + std * eps), so the actor loss
    # reaches the log-std outputs (tanh(mean) would leave their weights without gradient).
    torch.manual_seed(3)
    pi = agent.policy(agent.actor, s)
    torch.manual_seed(3)
    mu, log_std = agent.actor.net(s).chunk(2, dim=-1)
    want = torch.tanh(mu + log_std.clamp(-20.0, 2.0).exp() * torch.randn_like(mu))
    assert torch.allclose(pi, want, atol=1e-6)
    q = agent.critic.q1(torch.cat([s, pi], -1)).squeeze(-1)
    loss, _ = td3bc_actor_loss(q, pi, batch()["actions"], 2.5, 0.5)
    loss.backward()
    last = agent.actor.net[-1].weight.grad
    assert last[A:].abs().sum() > 0        # log-std rows
    # update() asks the actor and its target for samples, never for tanh(mean).
    modes = []
    for net in (agent.actor, agent.actor_target):
        net.register_forward_pre_hook(lambda m, args: modes.append(args[1]))
    agent.update(batch(seed=1))
    agent.update(batch(seed=2))           # the second step updates the actor
    assert len(modes) == 3 and not any(modes)


def test_td3bc_policy_file_rebuilds_the_configured_actor(tmp_path):
    torch.manual_seed(0)
    cfg = TD3BCConfig(hidden=[16, 16], **AUTHORS_TD3BC)
    agent = TD3BC.from_dataset(fake_dataset(), cfg)
    for i in range(4):
        agent.update(batch(seed=i))
    save_policy(agent, "td3bc", tmp_path / "policy.pt")
    loaded, method = load_policy(tmp_path / "policy.pt")
    assert method == "td3bc" and isinstance(loaded.actor, TanhGaussianActor)
    assert loaded.cfg == cfg
    x = batch(seed=5)["obs"]
    assert torch.equal(loaded.act(x), agent.act(x))


def test_td3bc_without_target_smoothing_uses_the_target_actors_action():
    torch.manual_seed(0)
    s2 = batch()["next_obs"]
    plain = TD3BC(O, A, TD3BCConfig(hidden=[16, 16], target_smoothing=False))
    state = torch.get_rng_state()
    a2 = plain.target_action(s2)
    assert torch.equal(a2, plain.actor_target(s2))
    assert torch.equal(torch.get_rng_state(), state)     # no noise drawn
    b = batch()
    y = b["rewards"] + 0.99 * (1 - b["terminals"]) * plain.critic_target(
        plain.normalizer(b["next_obs"]), plain.actor_target(plain.normalizer(b["next_obs"]))
    ).min(0).values
    assert torch.allclose(plain.td_target(b), y)
    smoothed = TD3BC(O, A, TD3BCConfig(hidden=[16, 16]))
    smoothed.load_state_dict(plain.state_dict())
    assert not torch.equal(smoothed.target_action(s2), a2)
    # Stochastic actor: the target action is the target actor's own sample, nothing added.
    torch.manual_seed(0)
    gauss = TD3BC(O, A, TD3BCConfig(hidden=[16, 16], actor="tanh_gaussian",
                                    target_smoothing=False))
    torch.manual_seed(4)
    a2 = gauss.target_action(s2)
    torch.manual_seed(4)
    assert torch.equal(a2, gauss.actor_target(s2)[0])
    gauss.cfg.target_smoothing = True
    torch.manual_seed(4)
    assert not torch.equal(gauss.target_action(s2), a2)


def test_td3bc_bc_weight_scales_the_behaviour_cloning_term():
    q = torch.tensor([2.0, -4.0, 6.0])
    pi = torch.tensor([[0.5, 0.0], [0.1, -0.2], [1.0, 1.0]])
    a = torch.tensor([[0.0, 0.0], [0.1, 0.2], [0.0, 1.0]])
    full, _ = td3bc_actor_loss(q, pi, a, alpha=2.5)
    half, _ = td3bc_actor_loss(q, pi, a, alpha=2.5, bc_weight=0.5)
    bc = (0.25 + 0 + 0 + 0.16 + 1 + 0) / 6
    assert full.item() - half.item() == pytest.approx(0.5 * bc)
    # ... and update() passes it on: same seed, same critic step, actor loss differs by
    # 0.5 * mean (pi(s) - a)^2 at the first actor step.
    losses = {}
    for w in (1.0, 0.5):
        torch.manual_seed(0)
        agent = TD3BC(O, A, TD3BCConfig(hidden=[16, 16], bc_weight=w))
        agent.update(batch(seed=0))
        b = batch(seed=1)
        mse = ((agent.pi(b["obs"]) - b["actions"]) ** 2).mean().item()  # actor not yet moved
        losses[w] = (agent.update(b)["actor_loss"], mse)
    assert losses[1.0][1] == pytest.approx(losses[0.5][1])
    assert losses[1.0][0] - losses[0.5][0] == pytest.approx(0.5 * losses[1.0][1], rel=1e-5)


@pytest.mark.parametrize("cls, cfg_cls", [(TD3BC, TD3BCConfig), (CQL, CQLConfig)])
def test_edm_weight_init(cls, cfg_cls):
    torch.manual_seed(0)
    agent = cls(O, A, cfg_cls(hidden=[512, 512], weight_init="edm"))
    for net in (agent.actor, agent.critic):
        for layer in (m for m in net.modules() if isinstance(m, torch.nn.Linear)):
            assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
            want = math.sqrt(1.0 / layer.in_features)
            assert layer.weight.std().item() == pytest.approx(want, rel=0.1)
    assert all(torch.equal(p, q) for p, q in zip(agent.critic.parameters(),
                                                  agent.critic_target.parameters()))


def test_log_std_bounds_are_configurable():
    actor = TanhGaussianActor(O, A, [16], log_std_min=-20.0, log_std_max=2.0)
    default = TanhGaussianActor(O, A, [16])
    default.load_state_dict(actor.state_dict())
    with torch.no_grad():
        for net in (actor, default):
            net.net[-1].bias[A:] = -15.0
            net.net[-1].weight[A:] = 0.0
    x = torch.randn(64, O)
    spread = lambda net: (net(x)[0] - net(x, True)[0]).abs().max().item()  # noqa: E731
    assert spread(actor) < 1e-5 < spread(default)      # std e^-15 vs the e^-5 floor


# ---- the DyDiff authors' CQL settings (rlkit/algo/cql.py) ------------------------------------

def test_cql_normalize_obs_fits_stats_and_evaluates_identically_after_reload(tmp_path):
    torch.manual_seed(0)
    ds = fake_dataset()
    cfg = CQLConfig(hidden=[16, 16], normalize_obs=True, obs_std_eps=1e-6)
    agent = CQL.from_dataset(ds, cfg)
    mean, std = ds.observations.mean(0), ds.observations.std(0) + 1e-6
    assert np.allclose(agent.normalizer.mean.numpy(), mean, atol=1e-5)
    assert np.allclose(agent.normalizer.std.numpy(), std, atol=1e-5)
    for i in range(3):
        agent.update(batch(seed=i))
    x = torch.as_tensor(ds.observations[:6])
    z = (x - torch.as_tensor(mean)) / torch.as_tensor(std)
    assert torch.allclose(agent.act(x), agent.actor(z, True)[0], atol=1e-5)
    assert not torch.allclose(agent.act(x), agent.actor(x, True)[0])
    save_policy(agent, "cql", tmp_path / "policy.pt")
    loaded, _ = load_policy(tmp_path / "policy.pt")
    assert torch.equal(loaded.normalizer.mean, agent.normalizer.mean)
    assert torch.equal(loaded.normalizer.std, agent.normalizer.std)
    assert torch.equal(loaded.act(x), agent.act(x))
    # The default agent has no statistics (its saved state keeps the old keys).
    assert CQL(O, A, CQLConfig(hidden=[16, 16])).normalizer is None
    assert not any("normalizer" in k for k in CQL(O, A).state_dict())


def test_cql_update_standardises_the_batch():
    ds = fake_dataset()
    torch.manual_seed(0)
    norm = CQL.from_dataset(ds, CQLConfig(hidden=[16, 16], normalize_obs=True))
    torch.manual_seed(0)
    plain = CQL(O, A, CQLConfig(hidden=[16, 16]))
    b = batch()
    z = {**b, "obs": norm.normalizer(b["obs"]), "next_obs": norm.normalizer(b["next_obs"])}
    torch.manual_seed(1)
    a = norm.update(b)
    torch.manual_seed(1)
    assert plain.update(z) == a      # same as an unnormalised agent fed standardised obs


def test_cql_log_alpha_clamp_bounds_the_actor_losss_alpha():
    torch.manual_seed(0)
    agent = CQL(O, A, CQLConfig(hidden=[16, 16], log_alpha_clamp=[-10.0, 0.5]))
    obs = batch()["obs"]

    def expected(alpha):
        torch.manual_seed(1)
        act, logp = agent.actor(obs)
        return (alpha * logp - agent.critic(obs, act).min(0).values).mean().item()

    for log_alpha, used in ((3.0, 0.5), (-20.0, -10.0), (0.2, 0.2)):
        with torch.no_grad():
            agent.log_alpha.fill_(log_alpha)
        assert agent.policy_alpha.item() == pytest.approx(math.exp(used), rel=1e-6)
        torch.manual_seed(1)
        loss, _ = agent.actor_loss(obs)
        assert loss.item() == pytest.approx(expected(math.exp(used)), rel=1e-5)
        assert agent.alpha.item() == pytest.approx(math.exp(log_alpha), rel=1e-6)
    # The temperature's own loss is on the unclamped log-alpha: it still moves at 3.0.
    with torch.no_grad():
        agent.log_alpha.fill_(3.0)
    info = agent.update(batch())
    assert agent.log_alpha.item() != 3.0
    assert info["policy_alpha"] == pytest.approx(math.exp(0.5))
    unclamped = CQL(O, A, CQLConfig(hidden=[16, 16]))
    with torch.no_grad():
        unclamped.log_alpha.fill_(3.0)
    assert unclamped.policy_alpha.item() == pytest.approx(math.exp(3.0))


@pytest.mark.parametrize("first", [False, True])
def test_cql_alpha_before_actor_uses_the_updated_alpha(first):
    torch.manual_seed(0)
    agent = CQL(O, A, CQLConfig(hidden=[16, 16], alpha_before_actor=first, alpha_lr=0.1,
                                log_alpha_clamp=[-100.0, 100.0]))
    before = agent.log_alpha.item()
    info = agent.update(batch())
    after = agent.log_alpha.item()
    assert after != before
    used = after if first else before
    assert info["policy_alpha"] == pytest.approx(math.exp(used), rel=1e-6)


def test_authors_settings_parse_and_bad_values_name_the_key():
    assert from_dict(TD3BCConfig, AUTHORS_TD3BC).actor == "tanh_gaussian"
    assert from_dict(CQLConfig, AUTHORS_CQL).log_alpha_clamp == [-10.0, 0.5]
    with pytest.raises(ConfigError, match="td3bc.actor: 'gaussian' is not one of"):
        from_dict(TD3BCConfig, {"actor": "gaussian"}, where="td3bc")
    with pytest.raises(ConfigError, match="td3bc.bc_weight"):
        from_dict(TD3BCConfig, {"bc_weight": -1.0}, where="td3bc")
    with pytest.raises(ConfigError, match="cql.log_alpha_clamp"):
        from_dict(CQLConfig, {"log_alpha_clamp": [0.5, -10.0]}, where="cql")
    with pytest.raises(ConfigError, match="cql.weight_init"):
        from_dict(CQLConfig, {"weight_init": "xavier"}, where="cql")


# ---- the reference sources' options (baselines/reference_settings.yaml) ----------------------

def _cosine_reference(lr: float, epochs: int, every: int, updates: int) -> list[float]:
    """The lr of each update as OfflineRL-Kit gets it: torch's CosineAnnealingLR(T_max=epochs)
    stepped after every epoch of `every` updates (mb_policy_trainer.py:57-94)."""
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    out = []
    for t in range(updates):
        out.append(opt.param_groups[0]["lr"])
        if (t + 1) % every == 0:
            opt.step()
            sched.step()
    return out


def test_sac_cosine_actor_lr_follows_offlinerl_kits_schedule():
    torch.manual_seed(0)
    cfg = SACConfig(hidden=[8], actor_lr=1e-3, actor_lr_schedule="cosine",
                    actor_lr_schedule_steps=12, actor_lr_schedule_every=3)
    agent = SAC(O, A, cfg)
    used = []
    for i in range(12):
        agent.update(batch(seed=i))
        used.append(agent.actor_opt.param_groups[0]["lr"])
    assert used == pytest.approx(_cosine_reference(1e-3, 4, 3, 12), rel=1e-12, abs=1e-15)
    assert agent.critic_opt.param_groups[0]["lr"] == cfg.critic_lr  # only the actor's
    # the paper's horizon (3000 epochs of 1000 updates): start, middle, last epoch
    paper = SAC(O, A, SACConfig(hidden=[8], actor_lr_schedule="cosine",
                                actor_lr_schedule_steps=3_000_000, actor_lr_schedule_every=1000))
    ref = _cosine_reference(1e-4, 3000, 1, 3000)  # one entry per epoch
    for update in (0, 999, 1_500_000, 2_999_999):
        assert paper.actor_lr_at(update) == pytest.approx(ref[update // 1000], rel=1e-9)
    assert paper.actor_lr_at(0) == 1e-4 and paper.actor_lr_at(1_500_000) == pytest.approx(5e-5)
    assert paper.actor_lr_at(2_999_999) < 1e-10
    assert SAC(O, A, SACConfig(hidden=[8])).actor_lr_at(2_999_999) == 1e-4  # default: constant


def test_sac_alpha_clamp_bounds_the_temperature_of_both_losses():
    torch.manual_seed(0)
    clamped = SAC(O, A, SACConfig(hidden=[8], alpha=5.0, alpha_max=1.0))
    assert clamped.log_alpha.exp().item() == pytest.approx(5.0)
    assert clamped.alpha.item() == 1.0
    torch.manual_seed(0)
    at_one = SAC(O, A, SACConfig(hidden=[8], alpha=1.0))
    torch.manual_seed(1)
    a = clamped.update(batch())
    torch.manual_seed(1)
    b = at_one.update(batch())
    # same weights, same draws: the TD target and actor loss saw alpha = 1 in both
    assert (a["critic_loss"], a["actor_loss"]) == (b["critic_loss"], b["actor_loss"])
    assert clamped.log_alpha.item() > math.log(1.0) and a["alpha"] == 1.0


def test_new_options_default_to_todays_behaviour():
    """Defaults select nothing new: the same parameters (no new state_dict entries), a constant
    actor lr, an unclamped temperature, the same training-state keys."""
    sac, cql = SAC(O, A), CQL(O, A)
    assert (SACConfig().actor_lr_schedule, SACConfig().alpha_max, SACConfig().weight_init,
            SACConfig().log_std_scale_offset) == ("constant", None, "torch", None)
    cfg = CQLConfig()
    assert (cfg.losses_before_steps, cfg.importance_sample, cfg.max_target_backup,
            cfg.normalize_reward) == (False, True, False, False)
    for agent in (sac, cql):
        assert not any("log_std_scale" in k or "reward_scale" in k for k in agent.state_dict())
        assert "updates" not in agent.training_state()
    sac.log_alpha.data.fill_(3.0)
    assert sac.alpha.item() == pytest.approx(math.exp(3.0))


def test_corl_losses_before_steps_computes_the_critic_loss_at_the_pre_update_actor():
    import copy
    torch.manual_seed(0)
    agent = CQL(O, A, CQLConfig(hidden=[8], losses_before_steps=True, actor_lr=0.5))
    twin = copy.deepcopy(agent)
    torch.manual_seed(3)
    info = agent.update(batch())
    torch.manual_seed(3)
    twin.actor(batch()["obs"])                  # the update's first draw: the actor's sample
    closs, twin_info = twin.critic_loss(batch())
    assert info["critic_loss"] == twin_info["critic_loss"]
    assert info["cql_loss"] == twin_info["cql_loss"]


def test_corl_initialisation_and_log_std_affine():
    torch.manual_seed(0)
    agent = CQL(O, A, CQLConfig(**CQL_PRESETS["corl"]))
    for q in (agent.critic.q1, agent.critic.q2):
        linears = [m for m in q if isinstance(m, torch.nn.Linear)]
        assert len(linears) == 4  # 3 hidden Q layers
        w = linears[1].weight  # square hidden layer: orthogonal with gain sqrt(2)
        assert torch.allclose(w @ w.T, 2 * torch.eye(256), atol=1e-4)
        assert all(float(l.bias.detach().abs().max()) == 0.0 for l in linears)
        assert torch.allclose(linears[-1].weight.norm(), torch.tensor(1e-2), rtol=1e-4)
    out = agent.actor.net[-1]
    assert float(out.bias.detach().abs().max()) == 0.0
    assert float(out.weight.detach().abs().max()) < 1e-2 * 0.2
    assert (agent.actor.log_std_scale.item(), agent.actor.log_std_offset.item()) == (1.0, -1.0)
    assert agent.actor.log_std_scale.requires_grad


def test_importance_sampling_off_and_max_target_backup_change_the_loss():
    infos = {}
    for name, extra in (("default", {}), ("no-is", {"importance_sample": False}),
                        ("max-backup", {"max_target_backup": True})):
        torch.manual_seed(0)
        agent = CQL(O, A, CQLConfig(hidden=[8], **extra))
        torch.manual_seed(1)
        infos[name] = agent.update(batch())
    assert infos["no-is"]["cql_loss"] != infos["default"]["cql_loss"]
    assert infos["max-backup"]["critic_loss"] != infos["default"]["critic_loss"]


def test_return_range_is_corls_on_qlearning_rows():
    # d4rl.qlearning_dataset drops the time-limit row (9.0), then CORL counts an episode until a
    # terminal or max_episode_steps rows: the cut episode runs on into the next one.
    rewards = np.array([1.0, 1.0, 1.0, 2.0, 2.0, 9.0, 0.5])
    terminals = np.array([0, 0, 1, 0, 0, 0, 1], dtype=bool)
    timeouts = np.array([0, 0, 0, 0, 0, 1, 0], dtype=bool)
    assert return_range(rewards, terminals, timeouts) == (3.0, 4.5)
    assert return_range(rewards, terminals, timeouts, max_episode_steps=2) == (0.5, 4.0)
    data = SimpleNamespace(obs_dim=O, act_dim=A, observations=fake_dataset().observations,
                           rewards=rewards, terminals=terminals, timeouts=timeouts)
    torch.manual_seed(0)
    agent = CQL.from_dataset(data, CQLConfig(hidden=[8], normalize_reward=True))
    assert agent.reward_scale.item() == pytest.approx(1000.0 / 1.5)
    torch.manual_seed(0)
    plain = CQL.from_dataset(data, CQLConfig(hidden=[8]))
    scaled = {**batch(), "rewards": batch()["rewards"] * (1000.0 / 1.5)}
    torch.manual_seed(1)
    a = agent.update(batch())
    torch.manual_seed(1)
    b = plain.update(scaled)
    assert a["critic_loss"] == pytest.approx(b["critic_loss"], rel=1e-6)
