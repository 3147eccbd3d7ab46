"""Soft Actor-Critic (Haarnoja et al. 2018) with automatic entropy tuning.

The base agent of MOPO / MBPO-style training, the online learner that generates the local
`medium`/`expert` datasets, and the parent of CQL. Agent interface shared by all agents:
`update(batch) -> dict of float losses` and `act(obs, deterministic) -> action` (no grad).
Batches are dicts of tensors: obs (B, o), actions (B, a), rewards (B,), next_obs (B, o),
terminals (B,) float in {0, 1}.

Speed (one CPU thread, batch 256; tests/benchmarks/test_bench_agents.py): the twin critics are
one `StackedMLP` (one weight tensor per layer for both), Adam is `fused`, the actor's loss goes
through the critic with its weights detached (their gradient used to be computed and thrown
away), target networks move in one `_foreach_lerp_`, and the logged numbers leave the tensors
in one conversion per update. tests/test_agent_equivalence.py checks the update against the
former formulation.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness.config import require
from harness.nets import StackedMLP, Standardizer, mlp, stack_linear_params


@dataclass
class SACConfig:
    hidden: list[int] = field(default_factory=lambda: [256, 256])
    actor_lr: float = 1e-4      # OfflineRL-Kit's MOPO/MBPO settings
    critic_lr: float = 3e-4
    alpha_lr: float = 1e-4
    gamma: float = 0.99
    tau: float = 0.005
    auto_alpha: bool = True
    # Initial (or fixed, if auto_alpha is false) temperature. OfflineRL-Kit's MOPO starts
    # log(alpha) at 0, i.e. 1.0 (run_example/run_mopo.py:129); CORL's CQL too (cql.py:505).
    alpha: float = 0.2
    target_entropy: float | None = None  # default: -act_dim (OfflineRL-Kit, CORL)
    # Clamp of the actor's log-std. Ours [-5, 2]; the DyDiff authors' TanhGaussianPolicy (also
    # CORL's CQL) uses [-20, 2]: FineArtz/DyDiff rlkit/policy.py:12-13,32; CORL
    # algorithms/offline/cql.py:276,286.
    log_std_min: float = -5.0
    log_std_max: float = 2.0
    # Linear-layer initialisation of actor and critics. "torch": PyTorch's default (CORL's
    # TD3+BC, OfflineRL-Kit). "edm": the DyDiff authors' EDM `Linear`, weight
    # sqrt(1/fan_in) * N(0, 1) and bias 0 (FineArtz/DyDiff training/networks.py:28-53,938-980).
    # "corl": CORL's CQL (algorithms/offline/cql.py:256-271,347,410): Q-networks orthogonal
    # (hidden layers gain sqrt(2), output gain 1e-2, biases 0); the actor keeps PyTorch's
    # default hidden layers and a Xavier-uniform (gain 1e-2) output layer, bias 0.
    weight_init: Literal["torch", "edm", "corl"] = "torch"
    # CORL's actor (algorithms/offline/cql.py:349-350,360): log-std = m * raw + o with learnable
    # scalars m, o initialised to [m, o] = [1.0, -1.0]. None (ours): log-std = raw.
    log_std_scale_offset: list[float] | None = None
    # Actor learning-rate schedule. "constant": ours, CORL. "cosine": OfflineRL-Kit's MOPO
    # (run_example/run_mopo.py:121 CosineAnnealingLR(actor_optim, T_max=epoch), stepped once per
    # epoch: offlinerlkit/policy_trainer/mb_policy_trainer.py:57-94): the k-th lr is
    # actor_lr * (1 + cos(pi * k / K)) / 2, k = updates done // actor_lr_schedule_every,
    # K = actor_lr_schedule_steps // actor_lr_schedule_every (OfflineRL-Kit: all of training,
    # 3000 epochs of 1000 updates).
    actor_lr_schedule: Literal["constant", "cosine"] = "constant"
    actor_lr_schedule_steps: int | None = None
    actor_lr_schedule_every: int = 1
    # Upper clamp of the temperature the losses use (the entropy tuning itself is unclamped).
    # OfflineRL-Kit's SAC: 1.0 (offlinerlkit/policy/model_free/sac.py:126); ours: none.
    alpha_max: float | None = None

    def validate(self) -> None:
        require(0 < self.gamma <= 1, "gamma", f"must be in (0, 1], got {self.gamma}")
        require(self.alpha > 0, "alpha", f"must be positive, got {self.alpha}")
        require(self.alpha_max is None or self.alpha_max > 0, "alpha_max",
                f"must be positive, got {self.alpha_max}")
        require(self.log_std_scale_offset is None or len(self.log_std_scale_offset) == 2,
                "log_std_scale_offset", f"must be [scale, offset], got {self.log_std_scale_offset}")
        require(self.actor_lr_schedule_every >= 1, "actor_lr_schedule_every",
                f"must be >= 1, got {self.actor_lr_schedule_every}")
        if self.actor_lr_schedule == "cosine":
            steps = self.actor_lr_schedule_steps
            require(steps is not None and steps >= self.actor_lr_schedule_every,
                    "actor_lr_schedule_steps", f"the cosine schedule needs the number of updates "
                    f"it spans (>= actor_lr_schedule_every), got {steps}")
        require(0 < self.tau <= 1, "tau", f"must be in (0, 1], got {self.tau}")
        require(all(h > 0 for h in self.hidden), "hidden", "widths must be positive")
        require(self.log_std_min < self.log_std_max, "log_std_min",
                f"must be below log_std_max, got [{self.log_std_min}, {self.log_std_max}]")


@torch.no_grad()
def init_weights_(module: nn.Module, kind: str) -> nn.Module:
    """Re-initialise every nn.Linear of `module` in place: "torch" leaves PyTorch's default
    alone; "edm" is the DyDiff authors' EDM Linear (weight sqrt(1/fan_in) * N(0, 1), bias 0)."""
    if kind == "torch":
        return module
    if kind != "edm":
        raise ValueError(f"weight_init must be 'torch' or 'edm', got {kind!r}")
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            layer.weight.copy_(torch.randn_like(layer.weight) * math.sqrt(1.0 / layer.in_features))
            if layer.bias is not None:
                layer.bias.zero_()
    return module


@torch.no_grad()
def corl_init_(net: nn.Sequential, orthogonal: bool) -> nn.Sequential:
    """CORL's `init_module_weights` (algorithms/offline/cql.py:256-271) on one MLP: with
    `orthogonal`, hidden Linears orthogonal (gain sqrt 2) and the output orthogonal (gain 1e-2);
    without, hidden layers untouched and the output Xavier-uniform (gain 1e-2); biases 0."""
    linears = [m for m in net if isinstance(m, nn.Linear)]
    if orthogonal:
        for layer in linears[:-1]:
            nn.init.orthogonal_(layer.weight, gain=math.sqrt(2))
            nn.init.zeros_(layer.bias)
        nn.init.orthogonal_(linears[-1].weight, gain=1e-2)
    else:
        nn.init.xavier_uniform_(linears[-1].weight, gain=1e-2)
    nn.init.zeros_(linears[-1].bias)
    return net


@torch.no_grad()
def fit_obs_stats(normalizer: Standardizer, observations, eps: float) -> None:
    """Fix `normalizer` to the dataset's mean and population std + eps (as numpy computes it;
    CORL adds 1e-3, the DyDiff authors 1e-6)."""
    obs = torch.as_tensor(np.asarray(observations), dtype=torch.float32)
    normalizer.mean.copy_(obs.mean(0))
    normalizer.std.copy_(obs.std(0, correction=0) + eps)


def adam(params: Iterable[torch.Tensor], lr: float) -> torch.optim.Adam:
    """Adam as every agent builds it: `fused`, 3x faster per step on CPU than the for-loop
    default and within an ulp of it (`foreach` is bit-identical but barely faster)."""
    return torch.optim.Adam(params, lr=lr, fused=True)


def as_floats(info: dict[str, torch.Tensor]) -> dict[str, float]:
    """The logged scalars of one update as Python floats, in one conversion."""
    if not info:
        return {}
    return dict(zip(info, torch.stack([v.detach() for v in info.values()]).tolist()))


class TanhGaussianActor(nn.Module):
    """pi(a|s) = tanh(N(mu(s), sigma(s))), log-std clamped to [log_std_min, log_std_max]
    (default [-5, 2]); the deterministic action is tanh(mu)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int],
                 log_std_min: float = -5.0, log_std_max: float = 2.0,
                 log_std_scale_offset: list[float] | None = None):
        super().__init__()
        self.net = mlp(obs_dim, 2 * act_dim, hidden)
        self.log_std_min, self.log_std_max = log_std_min, log_std_max
        if log_std_scale_offset is not None:  # only then, so the default keeps its state_dict
            scale, offset = log_std_scale_offset
            self.log_std_scale = nn.Parameter(torch.tensor(float(scale)))
            self.log_std_offset = nn.Parameter(torch.tensor(float(offset)))

    def forward(self, obs: torch.Tensor, deterministic: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_std = self.dist(obs)
        if deterministic:
            return torch.tanh(mu), torch.zeros(obs.shape[:-1], device=obs.device)
        return self.sample(mu, log_std)

    def dist(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, clamped log-std) of the pre-tanh Gaussian at `obs`."""
        mu, log_std = self.net(obs).chunk(2, dim=-1)
        if hasattr(self, "log_std_scale"):
            log_std = self.log_std_scale * log_std + self.log_std_offset
        return mu, log_std.clamp(self.log_std_min, self.log_std_max)

    @staticmethod
    def sample(mu: torch.Tensor, log_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised tanh-Gaussian sample and its log-density (one randn draw of
        mu's shape, as `forward` makes), so rows repeated after `dist` cost no forward."""
        noise = torch.randn_like(mu)
        pre = mu + log_std.exp() * noise
        # log N(pre; mu, std) - sum log(1 - tanh(pre)^2), the latter in a stable form;
        # (pre - mu) / std is the noise itself (no gradient), so it enters as such.
        log_prob = (-0.5 * noise ** 2 - log_std - 0.5 * math.log(2 * math.pi)
                    - 2 * (math.log(2) - pre - F.softplus(-2 * pre))).sum(-1)
        return torch.tanh(pre), log_prob


class TwinQ(nn.Module):
    """Two Q-networks over [obs, act] in one StackedMLP; forward returns (2, B).

    Built as two plain MLPs, each passed to `init` (q1's layers, then q2's: the RNG draws of
    separate networks), then stacked. `q1`/`q2` are the members as plain MLPs (views of the
    stacked weights). State dicts of the former layout (q1.*, q2.*) load as well."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int],
                 init: Callable[[nn.Sequential], object] | None = None):
        super().__init__()
        members = [mlp(obs_dim + act_dim, 1, hidden) for _ in range(2)]
        if init is not None:
            for net in members:
                init(net)
        self.net = StackedMLP(members)

    def forward(self, obs: torch.Tensor, act: torch.Tensor, members: slice | None = None,
                detach: bool = False) -> torch.Tensor:
        """Q of each member (or of the slice `members`), (E, B); `detach`: gradients reach
        only obs and act (StackedMLP.forward)."""
        return self.net(torch.cat([obs, act], -1), members, detach).squeeze(-1)

    @property
    def q1(self) -> nn.Sequential:
        return self.net.member(0)

    @property
    def q2(self) -> nn.Sequential:
        return self.net.member(1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Former layout: two nn.Sequential, Linear k of q1/q2 at index 2k.
        for k in range(len(self.net.layers)):
            old = [f"{prefix}{q}.{2 * k}.{kind}" for q in ("q1", "q2")
                   for kind in ("weight", "bias")]
            if all(key in state_dict for key in old):
                w1, b1, w2, b2 = (state_dict.pop(key) for key in old)
                new = f"{prefix}net.layers.{k}."
                state_dict[new + "weight"], state_dict[new + "bias"] = stack_linear_params(
                    [w1, w2], [b1, b2])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def stack_twin_q_adam_state(state: dict) -> dict:
    """An Adam state dict over a former-layout TwinQ (q1's weight, bias, ..., then q2's) as
    one over its StackedMLP (the moments stacked as the weights are), so an old checkpoint
    resumes."""
    params = state["param_groups"][0]["params"]
    half = len(params) // 2
    moments = {}
    for k in range(0, half, 2):  # (weight, bias) of layer k // 2
        old = [state["state"].get(i) for i in (params[k], params[k + 1], params[half + k],
                                                params[half + k + 1])]
        if any(s is None for s in old):
            continue
        w1, b1, w2, b2 = old
        moments[k], moments[k + 1] = {"step": w1["step"]}, {"step": b1["step"]}
        for name in w1.keys() - {"step"}:
            moments[k][name], moments[k + 1][name] = stack_linear_params(
                [w1[name], w2[name]], [b1[name], b2[name]])
    return {"state": moments,
            "param_groups": [{**state["param_groups"][0], "params": list(range(half))}]}


class SAC(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, cfg: SACConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or SACConfig()
        self.obs_dim, self.act_dim = obs_dim, act_dim
        # Each network re-initialised right after it is built (the global RNG order "edm" had).
        corl = cfg.weight_init == "corl"
        self.actor = TanhGaussianActor(obs_dim, act_dim, cfg.hidden, cfg.log_std_min,
                                       cfg.log_std_max, cfg.log_std_scale_offset)
        if corl:
            corl_init_(self.actor.net, orthogonal=False)
        else:
            init_weights_(self.actor, cfg.weight_init)
        self.critic = TwinQ(obs_dim, act_dim, cfg.hidden,
                            init=(lambda q: corl_init_(q, orthogonal=True)) if corl
                            else (lambda q: init_weights_(q, cfg.weight_init)))
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(cfg.alpha)))
        self.target_entropy = (cfg.target_entropy if cfg.target_entropy is not None
                               else -float(act_dim))
        self.actor_opt = adam(self.actor.parameters(), cfg.actor_lr)
        self.critic_opt = adam(self.critic.parameters(), cfg.critic_lr)
        self.alpha_opt = adam([self.log_alpha], cfg.alpha_lr)
        self.updates = 0  # gradient updates done (the actor-lr schedule's clock)

    def actor_lr_at(self, update: int) -> float:
        """The actor's learning rate for the `update`-th update (0-based)."""
        cfg = self.cfg
        if cfg.actor_lr_schedule == "constant":
            return cfg.actor_lr
        k, every = update // cfg.actor_lr_schedule_every, cfg.actor_lr_schedule_every
        return cfg.actor_lr * (1 + math.cos(math.pi * k / (cfg.actor_lr_schedule_steps // every))) / 2

    def start_update(self) -> None:
        """Called first in every update: sets this update's actor lr and advances the clock."""
        if self.cfg.actor_lr_schedule != "constant":
            for group in self.actor_opt.param_groups:
                group["lr"] = self.actor_lr_at(self.updates)
        self.updates += 1

    @classmethod
    def from_dataset(cls, dataset, cfg=None):
        """The agent sized for `dataset` (every agent has this constructor)."""
        return cls(dataset.obs_dim, dataset.act_dim, cfg)

    @property
    def alpha(self) -> torch.Tensor:
        """The temperature the losses use (at most `alpha_max`, if set)."""
        alpha = self.log_alpha.exp().detach()
        return alpha if self.cfg.alpha_max is None else alpha.clamp(max=self.cfg.alpha_max)

    @property
    def policy_alpha(self) -> torch.Tensor:
        """The temperature the actor loss uses (CQL may clamp it)."""
        return self.alpha

    @torch.no_grad()
    def act(self, obs: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        return self.actor(obs, deterministic)[0]

    def td_target(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            next_act, next_logp = self.actor(batch["next_obs"])
            next_q = self.critic_target(batch["next_obs"], next_act).min(0).values
            next_v = next_q - self.alpha * next_logp
            return batch["rewards"] + self.cfg.gamma * (1 - batch["terminals"]) * next_v

    def critic_loss(self, batch: dict[str, torch.Tensor]
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, logged scalars as 0-d tensors)."""
        q = self.critic(batch["obs"], batch["actions"])
        loss = F.mse_loss(q, self.td_target(batch).expand_as(q), reduction="none").mean(1).sum()
        return loss, {"critic_loss": loss.detach(), "q_mean": q.detach().mean()}

    def actor_loss(self, obs: torch.Tensor, sample: tuple[torch.Tensor, torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, log pi) on `sample` = (actions, log-probs) from the actor (drawn here if None).
        The critic's weights enter detached: this loss trains the actor only."""
        act, logp = self.actor(obs) if sample is None else sample
        q = self.critic(obs, act, detach=True).min(0).values
        return (self.policy_alpha * logp - q).mean(), logp

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.start_update()
        closs, info = self.critic_loss(batch)
        self.critic_opt.zero_grad(set_to_none=True)
        closs.backward()
        self.critic_opt.step()

        aloss, logp = self.actor_loss(batch["obs"])
        self.actor_opt.zero_grad(set_to_none=True)
        aloss.backward()
        self.actor_opt.step()
        info["actor_loss"] = aloss.detach()

        if self.cfg.auto_alpha:
            alpha_loss = -(self.log_alpha * (logp.detach() + self.target_entropy)).mean()
            self.alpha_opt.zero_grad(set_to_none=True)
            alpha_loss.backward()
            self.alpha_opt.step()
        info["alpha"] = self.alpha
        self.soft_update()
        return as_floats(info)

    @torch.no_grad()
    def soft_update(self) -> None:
        torch._foreach_lerp_(list(self.critic_target.parameters()),
                             list(self.critic.parameters()), self.cfg.tau)

    def training_state(self) -> dict:
        """Everything to resume training exactly: weights and optimiser moments."""
        state = {"model": self.state_dict(), "actor_opt": self.actor_opt.state_dict(),
                 "critic_opt": self.critic_opt.state_dict(),
                 "alpha_opt": self.alpha_opt.state_dict()}
        if self.cfg.actor_lr_schedule != "constant":
            state["updates"] = self.updates
        return state

    def load_training_state(self, state: dict) -> None:
        self.updates = state.get("updates", 0)
        self.load_state_dict(state["model"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(critic_opt_state(self.critic, state["critic_opt"]))
        self.alpha_opt.load_state_dict(state["alpha_opt"])


def critic_opt_state(critic: TwinQ, state: dict) -> dict:
    """A critic optimiser's saved state for `critic`, converted if it predates the stacked
    critics (twice as many tensors)."""
    former = len(state["param_groups"][0]["params"]) == 2 * len(list(critic.parameters()))
    return stack_twin_q_adam_state(state) if former else state
