"""Diffusion-QL (agents/diffql.py) against its sources: the original (Zhendong-Wang/
Diffusion-Policies-for-Offline-RL) and the DyDiff authors' variant (FineArtz/DyDiff)."""
import copy
import math

import numpy as np
import pytest
import torch

from agents.diffql import DiffQL, DiffQLConfig, DiffusionActor
from harness import registry
from harness.config import ConfigError, from_dict

OBS, ACT, B = 5, 2, 16
TINY = {"actor_hidden": [16, 16], "critic_hidden": [16, 16], "t_dim": 8}


def batch(n: int = B, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"obs": torch.randn(n, OBS, generator=g), "actions": torch.rand(n, ACT, generator=g) * 2 - 1,
            "rewards": torch.randn(n, generator=g), "next_obs": torch.randn(n, OBS, generator=g),
            "terminals": (torch.rand(n, generator=g) < 0.1).float()}


def agent(**cfg) -> DiffQL:
    torch.manual_seed(0)
    return DiffQL(OBS, ACT, DiffQLConfig(**{**TINY, **cfg}))


def test_vp_betas_for_t5_are_the_sources_formula():
    """main.py:197-198 make T = 5 and vp the defaults; agents/helpers.py:57-64's betas."""
    cfg = DiffQLConfig()
    assert (cfg.n_timesteps, cfg.beta_schedule) == (5, "vp")
    T, b_min, b_max = 5, 0.1, 10.0
    want = [1 - math.exp(-b_min / T - 0.5 * (b_max - b_min) * (2 * t - 1) / T ** 2)
            for t in range(1, T + 1)]
    actor = DiffusionActor(OBS, ACT, cfg)
    assert actor.betas.dtype == torch.float32
    assert actor.betas.tolist() == pytest.approx(want, rel=1e-6)
    # the first values by hand: 1 - exp(-0.02 - 0.198) and 1 - exp(-0.02 - 0.594)
    assert actor.betas[:2].tolist() == pytest.approx([1 - math.exp(-0.218), 1 - math.exp(-0.614)],
                                                     rel=1e-6)
    abar = np.cumprod(1 - np.array(want))
    assert actor.sqrt_abar.tolist() == pytest.approx(np.sqrt(abar).tolist(), rel=1e-6)


def _eps_calls(actor: DiffusionActor):
    """Outputs of every eps_theta call, gradients retained."""
    outs = []

    def hook(_, __, out):
        if out.requires_grad:
            out.retain_grad()
            outs.append(out)
    return outs, actor.eps_net.register_forward_hook(hook)


def test_original_q_term_reaches_the_actor_through_every_reverse_step():
    ag = agent()
    s = torch.randn(B, OBS)
    outs, handle = _eps_calls(ag.actor)
    a = ag.actor.sample(s)
    handle.remove()
    assert len(outs) == ag.cfg.n_timesteps
    (-ag.q(ag.critics, s, a)[0].mean()).backward()
    for k, out in enumerate(outs):  # step T-1 (first) ... step 0 (last)
        assert out.grad is not None and out.grad.abs().sum() > 0, f"reverse step {k}"
    assert all(p.grad is not None for p in ag.actor.parameters())


def test_the_update_differentiates_the_chain_or_the_one_step_x0(monkeypatch):
    """q_term chain: the actor step samples the T-step chain with gradients; one_step (the
    DyDiff authors' use_pred_start): the only eps_theta call with gradients is L_bc's, whose
    x0_hat carries the Q term (its gradient changes with eta)."""
    for q_term, want_calls in (("chain", 1 + 5), ("one_step", 1)):
        ag = agent(q_term=q_term)
        outs, handle = _eps_calls(ag.actor)
        ag.update(batch())
        handle.remove()
        assert len(outs) == want_calls, q_term

    def grads(eta):
        ag = agent(q_term="one_step", eta=eta, grad_norm=0.0)
        torch.manual_seed(1)
        b = batch()
        s = ag.normalizer(b["obs"])
        bc, x0 = ag.actor.bc_loss(b["actions"], s)
        q = ag.q(ag.critics, s, x0)
        loss = bc + eta * (-q[0].mean() / q[1].abs().mean().detach())
        return torch.autograd.grad(loss, list(ag.actor.parameters()))
    with_q, without_q = grads(1.0), grads(0.0)
    assert any((g1 - g0).abs().sum() > 0 for g1, g0 in zip(with_q, without_q))


def test_one_step_x0_is_the_clamped_prediction_from_the_bc_noise():
    """DiffusionActor.py:219-233: same t and noise as L_bc, x0_hat clamped to the bound."""
    ag = agent(max_action=0.3)
    a, s = torch.rand(B, ACT) * 0.6 - 0.3, torch.randn(B, OBS)
    torch.manual_seed(3)
    _, x0 = ag.actor.bc_loss(a, s)
    torch.manual_seed(3)
    t = torch.randint(0, 5, (B,))
    noise = torch.randn_like(a)
    act = ag.actor
    x_t = act.sqrt_abar[t, None] * a + act.sqrt_one_minus_abar[t, None] * noise
    eps = act.eps_net(x_t, act.time_embeddings(t), s)
    want = (act.sqrt_recip_abar[t, None] * x_t - act.sqrt_recipm1_abar[t, None] * eps).clamp(-0.3, 0.3)
    assert torch.equal(x0, want)
    assert x0.abs().max() <= 0.3


def test_critic_roles_are_swapped_at_random(monkeypatch):
    """L_q = -mean Q_i / mean|Q_j| with (i, j) = (1, 2) when the uniform draw is > 0.5."""
    ag = agent(q_term="one_step")
    seen = []
    real_rand = torch.rand

    def rand(*args, **kw):
        out = real_rand(*args, **kw)
        if args == ((),):
            seen.append(float(out))
        return out
    monkeypatch.setattr(torch, "rand", rand)
    for i in range(40):
        ag.update(batch(seed=i))
    assert len(seen) == 40 and min(seen) < 0.5 < max(seen)


def test_ema_holds_the_initial_weights_then_moves_when_the_source_says():
    """ql_diffusion.py:102-105,158-164: after update n the source's step is n - 1; the EMA moves
    when step % update_ema_every == 0 and step >= step_start_ema, by old * 0.995 + new * 0.005."""
    ag = agent(step_start_ema=7, update_ema_every=5)
    init = [p.clone() for p in ag.actor.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(ag.ema_actor.parameters(), init))
    moved = []
    for n in range(1, 23):
        before = [p.clone() for p in ag.ema_actor.parameters()]
        ag.update(batch(seed=n))
        after = list(ag.ema_actor.parameters())
        changed = any(not torch.equal(p, q) for p, q in zip(before, after))
        if changed:
            moved.append(n)
            want = [0.995 * p + 0.005 * q for p, q in zip(before, ag.actor.parameters())]
            assert all(torch.allclose(p, w, atol=1e-7) for p, w in zip(after, want))
        elif not moved:
            assert all(torch.equal(p, q) for p, q in zip(after, init))
    source_step = [n for n in range(1, 23) if (n - 1) % 5 == 0 and (n - 1) >= 7]
    assert moved == source_step == [11, 16, 21]
    assert DiffQLConfig().step_start_ema == 1000 and DiffQLConfig().update_ema_every == 5


def test_td_target_uses_the_ema_actor_and_the_min_of_the_target_critics(monkeypatch):
    ag = agent(max_q_backup=True, max_q_samples=3)
    calls = []
    real = DiffusionActor.sample

    def sample(self, s):
        calls.append((self is ag.ema_actor, s.shape[0]))
        return real(self, s)
    monkeypatch.setattr(DiffusionActor, "sample", sample)
    b = batch()
    torch.manual_seed(5)
    got = ag.td_target(b["next_obs"], b["rewards"], b["terminals"])
    assert calls == [(True, 3 * B)]
    torch.manual_seed(5)
    s2 = b["next_obs"].repeat_interleave(3, 0)
    a2 = real(ag.ema_actor, s2)
    q = ag.q(ag.critics_target, s2, a2).view(2, B, 3)
    want = b["rewards"] + 0.99 * (1 - b["terminals"]) * torch.minimum(q[0].amax(-1), q[1].amax(-1))
    assert torch.allclose(got, want)


def test_evaluation_picks_among_50_samples_by_softmax_of_min_target_q(monkeypatch):
    """ql_diffusion.py:187-194: 50 actor samples per state, one drawn by
    multinomial(softmax(min(Q1', Q2')))."""
    ag = agent()
    assert ag.cfg.eval_samples == 50
    n, k = 2000, 50
    cand = torch.linspace(-1, 1, k)[:, None].expand(k, ACT)
    sampled = []

    def sample(self, s):
        assert self is ag.actor  # the non-EMA actor
        sampled.append(s.shape[0])
        return cand.repeat(s.shape[0] // k, 1)
    monkeypatch.setattr(DiffusionActor, "sample", sample)
    # Q1 prefers candidate 3, Q2 candidate 7; min(Q1, Q2) gives p = 0.75 / 0.25 to 7 / 11
    logp = torch.full((k,), -1e4)
    logp[7], logp[11] = math.log(0.75), math.log(0.25)
    q1, q2 = logp.clone(), logp.clone()
    q1[3], q2[3] = 50.0, -1e4
    q1[7], q2[7] = 40.0, logp[7]
    monkeypatch.setattr(DiffQL, "q", staticmethod(
        lambda critics, s, a: torch.stack([q1, q2]).repeat(1, s.shape[0] // k)))
    torch.manual_seed(0)
    out = ag.act(torch.zeros(n, OBS))
    assert sampled == [n * k]
    idx = ((out[:, 0] + 1) / 2 * (k - 1)).round().long()
    assert set(idx.tolist()) == {7, 11}
    assert (idx == 7).float().mean().item() == pytest.approx(0.75, abs=0.03)


def test_rollout_action_is_one_chain_sample_of_the_actor():
    ag = agent()
    obs = torch.randn(4, OBS)
    torch.manual_seed(2)
    got = ag.rollout_action(obs)
    torch.manual_seed(2)
    with torch.no_grad():
        want = ag.actor.sample(ag.normalizer(obs))
    assert torch.equal(got, want)
    from dydiff.rollout import RolloutPolicy

    class Plain:  # an agent without rollout_action: act(obs, deterministic=True) as before
        def act(self, obs, deterministic=False):
            return torch.full((obs.shape[0], ACT), float(deterministic))
    assert RolloutPolicy(Plain()).act(obs).eq(1.0).all()
    torch.manual_seed(2)
    assert torch.equal(RolloutPolicy(ag).act(obs, deterministic=True), want)


@pytest.mark.parametrize("preset", ["wang", "dydiff-authors"])
def test_resume_is_bit_exact(preset):
    cfg = {**registry.DIFFQL_PRESETS[preset], **TINY, "step_start_ema": 2, "update_ema_every": 2,
           "lr_decay": True, "lr_decay_every": 3, "lr_decay_t_max": 4, "max_q_backup": True,
           "max_q_samples": 2}
    full = agent(**cfg)
    torch.manual_seed(10)
    for i in range(8):
        full.update(batch(seed=i))
    half = agent(**cfg)
    torch.manual_seed(10)
    for i in range(4):
        half.update(batch(seed=i))
    state, rng = copy.deepcopy(half.training_state()), torch.get_rng_state()
    resumed = agent(**cfg)
    resumed.load_training_state(state)
    torch.set_rng_state(rng)
    for i in range(4, 8):
        resumed.update(batch(seed=i))
    assert resumed.total_it == full.total_it == 8
    for (name, p), q in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    assert resumed.actor_opt.param_groups[0]["lr"] == full.actor_opt.param_groups[0]["lr"]


def test_lr_decay_is_the_cosine_schedule_stepped_once_per_50k_updates():
    ag = agent(lr_decay=True, lr_decay_every=2, lr_decay_t_max=4, actor_lr=1e-3, critic_lr=2e-3)
    lrs = []
    for i in range(8):
        ag.update(batch(seed=i))
        lrs.append(ag.actor_opt.param_groups[0]["lr"])
    k = [(i + 1) // 2 for i in range(8)]
    assert lrs == pytest.approx([1e-3 * (1 + math.cos(math.pi * j / 4)) / 2 for j in k])
    assert ag.critic_opts[0].param_groups[0]["lr"] == pytest.approx(2e-3 * 0)  # k = 4 = T_max
    c = DiffQLConfig()
    assert (c.lr_decay_every, c.lr_decay_t_max) == (50_000, 2000)
    # over the original's 2M updates (40 steps) the rate stays within 0.1 % of lr
    assert (1 + math.cos(math.pi * 40 / 2000)) / 2 > 0.999


def test_critics_as_each_source_builds_them():
    wang = agent(**{**registry.DIFFQL_PRESETS["wang"], "actor_hidden": [16]})
    assert [type(m).__name__ for m in wang.critics[0]] == \
        ["Linear", "Mish", "Linear", "Mish", "Linear", "Mish", "Linear"]
    assert len(wang.critic_opts) == 1
    authors = agent(**{**registry.DIFFQL_PRESETS["dydiff-authors"], "actor_hidden": [16]})
    assert [type(m).__name__ for m in authors.critics[0]] == \
        ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert len(authors.critic_opts) == 2 and authors.cfg.normalize_obs
    assert all(float(l.bias.detach().abs().sum()) == 0 for l in authors.critics[0]
               if isinstance(l, torch.nn.Linear))  # EDM init: zero biases


def test_per_critic_clipping_clips_each_critic_alone(monkeypatch):
    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def clip(params, max_norm, **kw):
        params = list(params)
        seen.append(sum(p.numel() for p in params))
        return real(params, max_norm, **kw)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    for preset, want in (("wang", 3), ("dydiff-authors", 4)):
        seen.clear()
        ag = agent(**{**registry.DIFFQL_PRESETS[preset], **TINY})
        ag.update(batch())
        n_q = sum(p.numel() for p in ag.critics[0].parameters())
        n_actor = sum(p.numel() for p in ag.actor.parameters())
        assert len(seen) == want - 1
        assert seen == ([2 * n_q, n_actor] if preset == "wang" else [n_q, n_q, n_actor])


def test_cpu_runs_are_deterministic():
    def run():
        ag = agent()
        torch.manual_seed(4)
        out = [ag.update(batch(seed=i)) for i in range(3)]
        return out, ag.act(torch.randn(3, OBS, generator=torch.Generator().manual_seed(0)))
    (a, x), (b, y) = run(), run()
    assert a == b and torch.equal(x, y)


@pytest.mark.parametrize("key,value,msg", [("q_term", "two_step", "q_term"),
                                           ("n_timesteps", 0, "n_timesteps"),
                                           ("eval_samples", 0, "eval_samples"),
                                           ("critic_activation", "tanh", "critic_activation")])
def test_bad_config_is_one_line_naming_the_key(key, value, msg):
    with pytest.raises(ConfigError, match=msg) as err:
        from_dict(DiffQLConfig, {key: value}, where="policy.diffql")
    assert "\n" not in str(err.value)


def test_agent_moves_to_the_device_of_its_inputs_without_cpu_tensors():
    """Every tensor is made on the device of the module or inputs (meta device: a CPU tensor
    mixed in would raise)."""
    ag = agent().to("meta")
    obs = torch.empty(3, OBS, device="meta")
    assert ag.rollout_action(obs).device.type == "meta"
    assert ag.td_target(obs, torch.empty(3, device="meta"),
                        torch.empty(3, device="meta")).device.type == "meta"


def test_dydiff_rollouts_take_the_agents_rollout_action_not_its_evaluation_action(monkeypatch):
    """DyDiff-DiffQL: the rollouts' actions are one chain sample (rlkit/trainer.py:254), through
    the agent interface (dydiff.rollout.RolloutPolicy), not the 50-sample evaluation choice."""
    from test_dydiff_rollout import RewardStandIn, _oracle_dynamics
    from dydiff.rollout import DyDiffConfig, DyDiffGenerator, _reward_fn
    torch.manual_seed(0)
    ag = DiffQL(3, 2, DiffQLConfig(**TINY))
    calls = {"rollout_action": 0, "act": 0}
    for name in calls:
        real = getattr(ag, name)

        def spy(*args, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*args, **kw)
        monkeypatch.setattr(ag, name, spy)
    cfg = from_dict(DyDiffConfig, {"rollout_batch_size": 8, "filter": "none", "init": "policy",
                                   "clip": False})
    gen = DyDiffGenerator(_oracle_dynamics(horizon=6), _reward_fn(RewardStandIn()),
                          lambda nxt: torch.zeros(nxt.shape[:2], dtype=torch.bool), cfg)
    out = gen.generate(ag, torch.randn(8, 3))
    assert calls["rollout_action"] > 0 and calls["act"] == 0
    assert out["actions"].shape[-1] == 2 and out["actions"].abs().max() <= 1.0


def test_offline_loop_interrupted_and_resumed_equals_uninterrupted(hopper_random, tmp_path):
    """Through the harness's checkpoint (RNG streams included), with model rollouts and
    evaluations: the run cut at step 13 and resumed in a fresh agent ends bit-identical."""
    from test_offline_loop import NoisyGenerator, cfg as loop_cfg, same_run
    from harness.training.offline_loop import offline_loop
    dq = DiffQLConfig(**{**TINY, "n_timesteps": 2, "eval_samples": 2, "step_start_ema": 4,
                         "update_ema_every": 2, "normalize_obs": True})

    def run(out, stop_at=None, init_seed=0):
        torch.manual_seed(init_seed)
        ag = DiffQL.from_dataset(hopper_random, dq)
        df = offline_loop(ag, hopper_random, loop_cfg(real_ratio=0.5), out, seed=7,
                          generator=NoisyGenerator(), progress=False, stop_at=stop_at)
        return ag, df
    full_agent, full = run(tmp_path / "full")
    run(tmp_path / "cut", stop_at=13)
    resumed_agent, resumed = run(tmp_path / "cut", init_seed=123)
    same_run(full, resumed, full_agent, resumed_agent)
    assert full["normalized_score"].notna().sum() == 2


@pytest.mark.parametrize("cfg", [{"q_term": "chain"}, {"q_term": "one_step"},
                                 {"q_term": "chain", "max_q_backup": True, "max_q_samples": 3},
                                 {**{k: v for k, v in registry.DIFFQL_PRESETS["dydiff-authors"]
                                     .items()}, **TINY}],
                         ids=["chain", "one_step", "max_q_backup", "authors"])
def test_flop_count_is_the_matmuls_the_update_runs(cfg):
    """agents/flops.py's DiffQL branch (benchmark and estimate) against torch's own count of
    the update's matmul FLOPs, forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode
    from agents.flops import update_flops
    ag = agent(**cfg)
    with FlopCounterMode(display=False) as counter:
        ag.update(batch(32))
    assert counter.get_total_flops() == update_flops(ag, 32)
