"""The agents' optimised updates (stacked twin critics, fused Adam, one actor forward and one
critic call for CQL's proposals, detached critic weights in the actor loss) against the plain
formulation they replaced, on fixed batches and seeds: the same logged losses, gradients and
updated parameters up to float error, for TD3+BC, SAC and CQL (paper `policy.cql`, `cql-corl`
and the other CQL options); and former-layout checkpoints load and resume.

The reference below is the former update (agents/*.py before the stacked critics), written
plainly, on copies of a new agent's weights: each stacked critic unstacked into two
nn.Sequential, Adam with torch's default for-loop step, `.item()` logging. Both draw the same
random numbers in the same order, so they agree up to float rounding.
tests/benchmarks/test_bench_agents.py times it next to the new update.

The comparisons run in float64: there the two agree to ~1e-13, so rtol 1e-5 / atol 1e-6 leaves
room only for a real difference. In float32 the rounding alone moves CQL's critic gradients by
up to ~1e-3 of their norm (the conservative term's gradient is softmax weights minus data
weights, a sum that cancels) and Adam turns it into parameter differences of a good part of a
step wherever a gradient element is near its eps; `test_float32_updates_agree` bounds that.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from agents.cql import CQL, CQLConfig
from agents.flops import update_flops
from agents.sac import SAC, SACConfig
from agents.td3bc import TD3BC, TD3BCConfig, smoothed_target_action, td3bc_actor_loss
from harness.config import from_dict
from harness.nets import StackedMLP, stack_linear_params
from harness.registry import CQL_PRESETS

ROOT = Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture
def float64():
    """Agents and batches built in float64 (the default dtype) for the test's duration."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


# ---- the former formulation ---------------------------------------------------------------

def plain_member(net: StackedMLP, i: int) -> nn.Sequential:
    """Member i of a stacked MLP as an independent nn.Sequential (own parameters, copied)."""
    layers: list[nn.Module] = []
    for layer in net.layers:
        linear = nn.utils.skip_init(nn.Linear, layer.in_features, layer.out_features)
        with torch.no_grad():
            linear.weight.copy_(layer.weight[i].T)
            linear.bias.copy_(layer.bias[i, 0])
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class RefTwinQ(nn.Module):
    """The former TwinQ: two separate MLPs, q1 and q2; forward returns (2, B)."""

    def __init__(self, twin):
        super().__init__()
        self.q1, self.q2 = plain_member(twin.net, 0), plain_member(twin.net, 1)

    def forward(self, obs, act):
        x = torch.cat([obs, act], -1)
        return torch.stack([self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)])

    def stacked(self, what=lambda p: p) -> list[torch.Tensor]:
        """`what` of each parameter, q1's and q2's stacked as the StackedMLP holds them."""
        return stacked(*([what(p) for p in q.parameters()] for q in (self.q1, self.q2)))


def stacked(q1: list[torch.Tensor], q2: list[torch.Tensor]) -> list[torch.Tensor]:
    """Tensors shaped as q1's and q2's (weight, bias, weight, ...) in StackedMLP's layout."""
    out = []
    for w1, b1, w2, b2 in zip(q1[0::2], q1[1::2], q2[0::2], q2[1::2]):
        out += stack_linear_params([w1, w2], [b1, b2])
    return out


def _adam(params, lr):
    return torch.optim.Adam(params, lr=lr)  # torch's default step, as the agents had


class RefSAC(nn.Module):
    """agents/sac.py's former SAC update on copies of `agent`'s weights. With `record`, the
    gradients of each backward are kept in `grads` (what .grad held right after it)."""

    def __init__(self, agent: SAC, record: bool = True):
        super().__init__()
        self.cfg, self.record, self.grads = agent.cfg, record, {}
        self.actor = copy.deepcopy(agent.actor)
        self.critic = RefTwinQ(agent.critic)
        self.critic_target = RefTwinQ(agent.critic_target).requires_grad_(False)
        self.log_alpha = nn.Parameter(agent.log_alpha.detach().clone())
        self.target_entropy, self.updates = agent.target_entropy, agent.updates
        self.lr_at = agent.actor_lr_at  # the schedule (unchanged) reads only the config
        self.actor_opt = _adam(self.actor.parameters(), self.cfg.actor_lr)
        self.critic_opt = _adam(self.critic.parameters(), self.cfg.critic_lr)
        self.alpha_opt = _adam([self.log_alpha], self.cfg.alpha_lr)

    def keep(self, name: str, params) -> None:
        if self.record:
            self.grads[name] = [p.grad.clone() for p in params]

    def start_update(self):
        if self.cfg.actor_lr_schedule != "constant":
            for group in self.actor_opt.param_groups:
                group["lr"] = self.lr_at(self.updates)
        self.updates += 1

    @property
    def alpha(self):
        alpha = self.log_alpha.exp().detach()
        return alpha if self.cfg.alpha_max is None else alpha.clamp(max=self.cfg.alpha_max)

    @property
    def policy_alpha(self):
        return self.alpha

    def td_target(self, batch):
        with torch.no_grad():
            next_act, next_logp = self.actor(batch["next_obs"])
            next_q = self.critic_target(batch["next_obs"], next_act).min(0).values
            next_v = next_q - self.alpha * next_logp
            return batch["rewards"] + self.cfg.gamma * (1 - batch["terminals"]) * next_v

    def critic_loss(self, batch):
        q = self.critic(batch["obs"], batch["actions"])
        loss = F.mse_loss(q, self.td_target(batch).expand_as(q), reduction="none").mean(1).sum()
        return loss, {"critic_loss": loss.item(), "q_mean": q.mean().item()}

    def actor_loss(self, obs, sample=None):
        act, logp = self.actor(obs) if sample is None else sample
        q = self.critic(obs, act).min(0).values
        return (self.policy_alpha * logp - q).mean(), logp

    def update_alpha(self, logp):
        if self.cfg.auto_alpha:
            alpha_loss = -(self.log_alpha * (logp.detach() + self.target_entropy)).mean()
            self.alpha_opt.zero_grad(set_to_none=True)
            alpha_loss.backward()
            self.keep("alpha", [self.log_alpha])
            self.alpha_opt.step()

    def step(self, name, opt, loss, params):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        self.keep(name, params)
        opt.step()

    def update(self, batch):
        self.start_update()
        closs, info = self.critic_loss(batch)
        self.step("critic", self.critic_opt, closs, self.critic.parameters())
        aloss, logp = self.actor_loss(batch["obs"])
        self.step("actor", self.actor_opt, aloss, self.actor.parameters())
        info["actor_loss"] = aloss.item()
        self.update_alpha(logp)
        info["alpha"] = self.alpha.item()
        self.soft_update()
        return info

    @torch.no_grad()
    def soft_update(self):
        for p, tp in zip(self.critic.parameters(), self.critic_target.parameters()):
            tp.lerp_(p, self.cfg.tau)

    def training_state(self):
        """In the former checkpoint layout (critic.q1.*, one Adam over q1's then q2's)."""
        state = {"model": self.state_dict(), "actor_opt": self.actor_opt.state_dict(),
                 "critic_opt": self.critic_opt.state_dict(),
                 "alpha_opt": self.alpha_opt.state_dict()}
        if self.cfg.actor_lr_schedule != "constant":
            state["updates"] = self.updates
        return state


class RefCQL(RefSAC):
    """agents/cql.py's former CQL update: three actor forwards (target, pi(s), pi(s') on the
    N-fold repeated states), two critic calls (data actions, 3N proposals)."""

    def __init__(self, agent: CQL, record: bool = True):
        super().__init__(agent, record)
        self.act_dim = agent.act_dim
        self.cql_log_alpha = nn.Parameter(agent.cql_log_alpha.detach().clone())
        self.cql_alpha_opt = _adam([self.cql_log_alpha], self.cfg.cql_alpha_lr)
        self.normalizer = copy.deepcopy(agent.normalizer)
        if self.cfg.normalize_reward:
            self.register_buffer("reward_scale", agent.reward_scale.clone())

    @property
    def policy_alpha(self):
        if self.cfg.log_alpha_clamp is None:
            return self.alpha
        lo, hi = self.cfg.log_alpha_clamp
        return self.log_alpha.detach().clamp(lo, hi).exp()

    def td_target(self, batch):
        with torch.no_grad():
            if self.cfg.max_target_backup:
                b, n = len(batch["next_obs"]), self.cfg.num_repeat_actions
                next_rep = batch["next_obs"].repeat_interleave(n, 0)
                next_act, next_logp = self.actor(next_rep)
                q = self.critic_target(next_rep, next_act).min(0).values.reshape(b, n)
                next_q, best = q.max(1)
                next_logp = next_logp.reshape(b, n).gather(1, best[:, None]).squeeze(1)
            else:
                next_act, next_logp = self.actor(batch["next_obs"])
                next_q = self.critic_target(batch["next_obs"], next_act).min(0).values
            if not self.cfg.deterministic_backup:
                next_q = next_q - self.policy_alpha * next_logp
            return batch["rewards"] + self.cfg.gamma * (1 - batch["terminals"]) * next_q

    @torch.no_grad()
    def sample_cql_actions(self, obs, next_obs):
        n, a, m = self.cfg.num_repeat_actions, self.act_dim, self.cfg.max_action
        obs_rep, next_rep = obs.repeat_interleave(n, 0), next_obs.repeat_interleave(n, 0)
        rand = (torch.rand(len(obs_rep), a) * 2 - 1) * m
        pi, logp_pi = self.actor(obs_rep)
        next_pi, logp_next_pi = self.actor(next_rep)
        logp_rand = torch.full_like(logp_pi, -a * math.log(2 * m))
        return obs_rep, torch.cat([rand, pi, next_pi]), torch.cat([logp_rand, logp_pi,
                                                                   logp_next_pi])

    def conservative_gap(self, q_data, obs_rep, acts, logp):
        b, n = q_data.shape[1], self.cfg.num_repeat_actions
        q_is = self.critic(obs_rep.repeat(3, 1), acts)
        if self.cfg.importance_sample:
            q_is = q_is - logp
        q_is = q_is.reshape(2, 3, b, n).permute(0, 2, 1, 3).reshape(2, b, 3 * n)
        if not self.cfg.importance_sample:
            q_is = torch.cat([q_is, q_data[..., None]], -1)
        t = self.cfg.temperature
        return t * torch.logsumexp(q_is / t, dim=-1).mean(-1) - q_data.mean(-1)

    def critic_loss(self, batch):
        q = self.critic(batch["obs"], batch["actions"])
        td_loss = F.mse_loss(q, self.td_target(batch).expand_as(q), reduction="none").mean(1)
        samples = self.sample_cql_actions(batch["obs"], batch["next_obs"])
        penalty = self.cfg.cql_weight * self.conservative_gap(q, *samples)
        info = {}
        if self.cfg.with_lagrange:
            cql_alpha = self.cql_log_alpha.exp().clamp(0.0, 1e6)
            cql_alpha_loss = -(cql_alpha * (penalty.detach() - self.cfg.lagrange_threshold)
                               ).mean()
            self.step("cql_alpha", self.cql_alpha_opt, cql_alpha_loss, [self.cql_log_alpha])
            penalty = cql_alpha.detach() * (penalty - self.cfg.lagrange_threshold)
            info["cql_alpha"] = cql_alpha.item()
        info.update(critic_loss=td_loss.sum().item(), cql_loss=penalty.sum().item(),
                    q_mean=q.mean().item())
        return (td_loss + penalty).sum(), info

    def update(self, batch):
        cfg = self.cfg
        self.start_update()
        if self.normalizer is not None:
            batch = {**batch, "obs": self.normalizer(batch["obs"]),
                     "next_obs": self.normalizer(batch["next_obs"])}
        if cfg.normalize_reward:
            batch = {**batch, "rewards": batch["rewards"] * self.reward_scale}
        sample = self.actor(batch["obs"])
        if cfg.alpha_before_actor:
            self.update_alpha(sample[1])
        policy_alpha = self.policy_alpha
        aloss, logp = self.actor_loss(batch["obs"], sample)
        if cfg.losses_before_steps:
            closs, info = self.critic_loss(batch)
            self.update_alpha(logp)
        self.step("actor", self.actor_opt, aloss, self.actor.parameters())
        if not cfg.losses_before_steps:
            if not cfg.alpha_before_actor:
                self.update_alpha(logp)
            closs, info = self.critic_loss(batch)
        self.step("critic", self.critic_opt, closs, self.critic.parameters())
        self.soft_update()
        info.update(actor_loss=aloss.item(), alpha=self.alpha.item())
        if cfg.log_alpha_clamp is not None:
            info["policy_alpha"] = policy_alpha.item()
        return info

    def training_state(self):
        return {**super().training_state(), "cql_alpha_opt": self.cql_alpha_opt.state_dict()}


class RefTD3BC(nn.Module):
    """agents/td3bc.py's former TD3+BC update (the actor loss through q1's own module)."""

    def __init__(self, agent: TD3BC, record: bool = True):
        super().__init__()
        self.cfg, self.record, self.grads = agent.cfg, record, {}
        self.normalizer = copy.deepcopy(agent.normalizer)
        self.actor = copy.deepcopy(agent.actor)
        self.actor_target = copy.deepcopy(agent.actor_target)
        self.critic = RefTwinQ(agent.critic)
        self.critic_target = RefTwinQ(agent.critic_target).requires_grad_(False)
        self.actor_opt = _adam(self.actor.parameters(), self.cfg.actor_lr)
        self.critic_opt = _adam(self.critic.parameters(), self.cfg.critic_lr)
        self.total_it = agent.total_it

    keep, step = RefSAC.keep, RefSAC.step

    def policy(self, net, s):
        if self.cfg.actor == "tanh_gaussian":
            return self.cfg.max_action * net(s, False)[0]
        return self.cfg.max_action * net(s)

    def td_target(self, batch):
        with torch.no_grad():
            s2 = self.normalizer(batch["next_obs"])
            a2 = self.policy(self.actor_target, s2)
            if self.cfg.target_smoothing:
                a2 = smoothed_target_action(a2, torch.randn_like(a2) * self.cfg.policy_noise,
                                            self.cfg)
            next_q = self.critic_target(s2, a2).min(0).values
            return batch["rewards"] + self.cfg.gamma * (1 - batch["terminals"]) * next_q

    def update(self, batch):
        self.total_it += 1
        s = self.normalizer(batch["obs"])
        target = self.td_target(batch)
        q = self.critic(s, batch["actions"])
        critic_loss = F.mse_loss(q, target.expand_as(q), reduction="none").mean(1).sum()
        self.step("critic", self.critic_opt, critic_loss, self.critic.parameters())
        info = {"critic_loss": critic_loss.item(), "q_mean": q.mean().item()}
        if self.total_it % self.cfg.policy_freq == 0:
            pi = self.policy(self.actor, s)
            q_pi = self.critic.q1(torch.cat([s, pi], -1)).squeeze(-1)
            actor_loss, lmbda = td3bc_actor_loss(q_pi, pi, batch["actions"], self.cfg.alpha,
                                                 self.cfg.bc_weight)
            self.step("actor", self.actor_opt, actor_loss, self.actor.parameters())
            with torch.no_grad():
                for net, target in ((self.critic, self.critic_target),
                                    (self.actor, self.actor_target)):
                    for p, tp in zip(net.parameters(), target.parameters()):
                        tp.lerp_(p, self.cfg.tau)
            info.update(actor_loss=actor_loss.item(), lmbda=lmbda.item())
        return info

    def training_state(self):
        return {"model": self.state_dict(), "actor_opt": self.actor_opt.state_dict(),
                "critic_opt": self.critic_opt.state_dict(), "total_it": self.total_it}


def reference(agent, record: bool = True):
    """The former formulation's agent on copies of `agent`'s current weights."""
    kind = RefCQL if isinstance(agent, CQL) else RefSAC if isinstance(agent, SAC) else RefTD3BC
    return kind(agent, record)


# ---- settings and data ---------------------------------------------------------------------

O, A = 17, 6


def paper_section(name: str) -> dict:
    """config/paper.yaml's `policy.<name>` section (the settings the paper grid runs)."""
    return yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())["policy"][name]


def make(kind: str, settings: dict, seed: int = 0):
    """A fresh agent with observation statistics (and reward scale) from a fake dataset."""
    cls, cfg_cls = {"td3bc": (TD3BC, TD3BCConfig), "sac": (SAC, SACConfig),
                    "cql": (CQL, CQLConfig)}[kind]
    cfg = from_dict(cfg_cls, settings, where=kind)
    rng = np.random.default_rng(seed)
    data = SimpleNamespace(obs_dim=O, act_dim=A,
                           observations=rng.normal(2.0, 3.0, (500, O)).astype(np.float32),
                           rewards=rng.normal(size=40), terminals=np.arange(40) % 10 == 9,
                           timeouts=np.zeros(40, bool))
    torch.manual_seed(seed)
    return cls.from_dataset(data, cfg)


def batch(b: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"obs": torch.randn(b, O, generator=g) * 3 + 2,
            "actions": torch.rand(b, A, generator=g) * 2 - 1,
            "rewards": torch.randn(b, generator=g),
            "next_obs": torch.randn(b, O, generator=g) * 3 + 2,
            "terminals": (torch.rand(b, generator=g) < 0.2).float()}


SMALL = [64, 64]
CASES = {
    "td3bc": ("td3bc", {}),
    "td3bc-authors": ("td3bc", dict(actor="tanh_gaussian", target_smoothing=False,
                                    bc_weight=0.5, obs_std_eps=1e-6, weight_init="edm")),
    "sac": ("sac", {}),
    "sac-paper": ("sac", {**paper_section("sac"), "actor_lr_schedule_steps": 6,
                          "actor_lr_schedule_every": 2}),
    "cql": ("cql", {}),
    "cql-paper": ("cql", paper_section("cql")),
    "cql-corl": ("cql", CQL_PRESETS["corl"]),
    "cql-lagrange": ("cql", dict(hidden=SMALL, with_lagrange=True, lagrange_threshold=2.0)),
    "cql-plain-lse": ("cql", dict(hidden=SMALL, importance_sample=False, temperature=2.0)),
    "cql-max-backup": ("cql", dict(hidden=SMALL, max_target_backup=True,
                                   deterministic_backup=False, log_alpha_clamp=[-1.0, 0.1])),
    "cql-reward-scale": ("cql", dict(hidden=SMALL, normalize_reward=True, num_repeat_actions=3,
                                     losses_before_steps=True)),
}


# ---- comparisons ---------------------------------------------------------------------------

def close(a, b, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def params_of(agent, ref) -> dict[str, tuple[list, list]]:
    """(new, reference) parameter lists, the reference's critics stacked."""
    pairs = {"actor": (list(agent.actor.parameters()), list(ref.actor.parameters())),
             "critic": (list(agent.critic.parameters()), ref.critic.stacked()),
             "critic_target": (list(agent.critic_target.parameters()),
                               ref.critic_target.stacked())}
    if isinstance(agent, TD3BC):
        pairs["actor_target"] = (list(agent.actor_target.parameters()),
                                 list(ref.actor_target.parameters()))
    else:
        pairs["log_alpha"] = ([agent.log_alpha], [ref.log_alpha])
    if isinstance(agent, CQL):
        pairs["cql_log_alpha"] = ([agent.cql_log_alpha], [ref.cql_log_alpha])
    return pairs


def new_grads(agent, name: str) -> list[torch.Tensor]:
    """The gradients the new update's last backward into `name` left in .grad."""
    if name in ("critic", "actor"):
        return [p.grad for p in getattr(agent, name).parameters()]
    return [(agent.log_alpha if name == "alpha" else agent.cql_log_alpha).grad]


def ref_grads(ref, name: str) -> list[torch.Tensor]:
    grads = ref.grads[name]
    if name == "critic":  # q1's, then q2's: stack them as the new critic holds them
        return stacked(grads[:len(grads) // 2], grads[len(grads) // 2:])
    return grads


def assert_same_update(agent, ref, b: dict, seed: int) -> dict:
    ref.grads.clear()
    torch.manual_seed(seed)
    got = agent.update(b)
    torch.manual_seed(seed)
    want = ref.update(b)
    assert got.keys() == want.keys()
    close(torch.tensor(list(got.values()), dtype=torch.float64),
          torch.tensor(list(want.values()), dtype=torch.float64), f"losses {list(got)}")
    for name in ref.grads:
        for i, (g, w) in enumerate(zip(new_grads(agent, name), ref_grads(ref, name))):
            close(g, w, f"{name} gradient {i}")
    for name, (new, old) in params_of(agent, ref).items():
        for i, (p, q) in enumerate(zip(new, old)):
            close(p.detach(), q.detach(), f"updated {name} parameter {i}")
    return got


@pytest.mark.parametrize("case", list(CASES))
def test_update_matches_the_former_formulation(case, float64):
    kind, settings = CASES[case]
    agent = make(kind, settings)
    ref = reference(agent)
    for name, (new, old) in params_of(agent, ref).items():  # the same starting point
        assert all(torch.equal(p, q) for p, q in zip(new, old)), name
    seen = set()
    for step in range(4):  # TD3+BC: two actor steps; the lr schedule moves every 2 updates
        seen |= set(assert_same_update(agent, ref, batch(seed=step), seed=100 + step))
    assert {"critic_loss", "q_mean"} <= seen
    assert ("actor_loss" in seen) and ref.grads  # the actor was updated and compared


def test_the_comparison_catches_a_wrong_gradient(float64):
    """The gradients compared are those each backward produced (the former actor loss also
    added to the critics' .grad, later discarded; the new one computes none), and a critic
    gradient off by 1e-3 fails the comparison."""
    agent = make("sac", {"hidden": SMALL})
    ref = reference(agent)
    b = batch()
    torch.manual_seed(1)
    agent.update(b)
    torch.manual_seed(1)
    ref.update(b)
    left = ref.critic.stacked(lambda p: p.grad)
    assert not torch.allclose(left[0], ref_grads(ref, "critic")[0])  # the actor loss added to it
    with pytest.raises(AssertionError, match="critic gradient"):
        wrong = [g * (1 + 1e-3) for g in ref_grads(ref, "critic")]
        for i, (g, w) in enumerate(zip(new_grads(agent, "critic"), wrong)):
            close(g, w, f"critic gradient {i}")


@pytest.mark.parametrize("case", ["td3bc-authors", "sac-paper", "cql-paper", "cql-corl"])
def test_former_layout_checkpoints_load_and_resume(case, float64):
    """A training state saved before the stacked critics (critic.q1.*, Adam over q1's then
    q2's tensors) loads into the new agent, weights and optimiser moments intact, and the
    next update agrees with the former code's."""
    kind, settings = CASES[case]
    ref = reference(make(kind, settings))
    for step in range(2):
        torch.manual_seed(step)
        ref.update(batch(seed=step))
    state = copy.deepcopy(ref.training_state())
    assert any(".q1." in k for k in state["model"])
    agent = make(kind, settings, seed=7)  # other weights, overwritten by the load
    agent.load_training_state(state)
    for name, (new, old) in params_of(agent, ref).items():
        assert all(torch.equal(p, q) for p, q in zip(new, old)), name
    moments = agent.critic_opt.state[agent.critic.net.layers[0].weight]["exp_avg"]
    assert torch.equal(moments, ref.critic.stacked(
        lambda p: ref.critic_opt.state[p]["exp_avg"])[0])
    assert_same_update(agent, ref, batch(seed=5), seed=9)


@pytest.mark.parametrize("case", ["td3bc", "sac", "cql", "cql-corl"])
def test_float32_updates_agree(case):
    """In float32 (what training runs) the two agree up to float32 rounding: the logged
    losses to 1e-4 and every gradient to 1e-2 of its norm (CQL's worst is ~1e-3)."""
    kind, settings = CASES[case]
    agent = make(kind, settings)
    ref = reference(agent)
    for step in range(4):
        ref.grads.clear()
        torch.manual_seed(step)
        got = agent.update(batch(seed=step))
        torch.manual_seed(step)
        want = ref.update(batch(seed=step))
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
        for name in ref.grads:
            for g, w in zip(new_grads(agent, name), ref_grads(ref, name)):
                assert (g - w).norm() <= 1e-2 * w.norm() + ATOL, name


class MatmulFlops(TorchDispatchMode):
    """Counts 2*m*k*n over every matmul dispatched (forward and backward)."""

    MATMULS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm,
               torch.ops.aten.baddbmm}

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.MATMULS:
            a, b = args[-2:] if func.overloadpacket in (torch.ops.aten.addmm,
                                                         torch.ops.aten.baddbmm) else args[:2]
            self.flops += 2 * a.numel() * b.shape[-1]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", ["td3bc", "td3bc-authors", "sac", "cql-paper", "cql-corl",
                                  "cql-max-backup"])
def test_flop_count_is_what_autograd_runs(case):
    """agents/flops.py's count equals the matmul FLOPs the update dispatches, for the new
    formulation and the former one (TD3+BC: over its policy_freq cycle)."""
    kind, settings = CASES[case]
    agent = make(kind, {**settings, "hidden": [32, 32], "num_repeat_actions": 3}
                 if kind == "cql" else {**settings, "hidden": [32, 32]})
    ref = reference(agent, record=False)
    b = batch(b=16)
    updates = agent.cfg.policy_freq if kind == "td3bc" else 1
    for run, former in ((agent.update, False), (ref.update, True)):
        with MatmulFlops() as count:
            for _ in range(updates):
                run(b)
        assert count.flops / updates == update_flops(agent, 16, former=former), former
