"""Soft Actor-Critic (Haarnoja et al. 2018) with automatic entropy tuning.

The base agent of MOPO / MBPO-style training, the online learner that generates the local
`medium`/`expert` datasets, and the parent of CQL. Agent interface shared by all agents:
`update(batch) -> dict of float losses` and `act(obs, deterministic) -> action` (no grad).
Batches are dicts of tensors: obs (B, o), actions (B, a), rewards (B,), next_obs (B, o),
terminals (B,) float in {0, 1}.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness.config import require
from harness.nets import Standardizer, mlp


@dataclass
class SACConfig:
    hidden: list[int] = field(default_factory=lambda: [256, 256])
    actor_lr: float = 1e-4      # OfflineRL-Kit's MOPO/MBPO settings
    critic_lr: float = 3e-4
    alpha_lr: float = 1e-4
    gamma: float = 0.99
    tau: float = 0.005
    auto_alpha: bool = True
    alpha: float = 0.2          # initial (or fixed, if auto_alpha is false) temperature
    target_entropy: float | None = None  # default: -act_dim
    # Clamp of the actor's log-std. Ours [-5, 2]; the DyDiff authors' TanhGaussianPolicy (also
    # CORL's CQL) uses [-20, 2]: FineArtz/DyDiff rlkit/policy.py:12-13,32; CORL
    # algorithms/offline/cql.py:276,286.
    log_std_min: float = -5.0
    log_std_max: float = 2.0
    # Linear-layer initialisation of actor and critics. "torch": PyTorch's default (CORL's
    # TD3+BC, OfflineRL-Kit). "edm": the DyDiff authors' EDM `Linear`, weight
    # sqrt(1/fan_in) * N(0, 1) and bias 0 (FineArtz/DyDiff training/networks.py:28-53,938-980).
    weight_init: Literal["torch", "edm"] = "torch"

    def validate(self) -> None:
        require(0 < self.gamma <= 1, "gamma", f"must be in (0, 1], got {self.gamma}")
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
def fit_obs_stats(normalizer: Standardizer, observations, eps: float) -> None:
    """Fix `normalizer` to the dataset's mean and population std + eps (as numpy computes it;
    CORL adds 1e-3, the DyDiff authors 1e-6)."""
    obs = torch.as_tensor(np.asarray(observations), dtype=torch.float32)
    normalizer.mean.copy_(obs.mean(0))
    normalizer.std.copy_(obs.std(0, correction=0) + eps)


class TanhGaussianActor(nn.Module):
    """pi(a|s) = tanh(N(mu(s), sigma(s))), log-std clamped to [log_std_min, log_std_max]
    (default [-5, 2]); the deterministic action is tanh(mu)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int],
                 log_std_min: float = -5.0, log_std_max: float = 2.0):
        super().__init__()
        self.net = mlp(obs_dim, 2 * act_dim, hidden)
        self.log_std_min, self.log_std_max = log_std_min, log_std_max

    def forward(self, obs: torch.Tensor, deterministic: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_std = self.net(obs).chunk(2, dim=-1)
        log_std = log_std.clamp(self.log_std_min, self.log_std_max)
        if deterministic:
            return torch.tanh(mu), torch.zeros(obs.shape[:-1], device=obs.device)
        std = log_std.exp()
        pre = mu + std * torch.randn_like(mu)
        # log N(pre; mu, std) - sum log(1 - tanh(pre)^2), the latter in a stable form.
        log_prob = (-0.5 * ((pre - mu) / std) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_prob = log_prob - (2 * (math.log(2) - pre - F.softplus(-2 * pre))).sum(-1)
        return torch.tanh(pre), log_prob


class TwinQ(nn.Module):
    """Two Q-networks evaluated together; forward returns (2, B)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int]):
        super().__init__()
        self.q1 = mlp(obs_dim + act_dim, 1, hidden)
        self.q2 = mlp(obs_dim + act_dim, 1, hidden)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, act], -1)
        return torch.stack([self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)])


class SAC(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, cfg: SACConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or SACConfig()
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.actor = init_weights_(
            TanhGaussianActor(obs_dim, act_dim, cfg.hidden, cfg.log_std_min, cfg.log_std_max),
            cfg.weight_init)
        self.critic = init_weights_(TwinQ(obs_dim, act_dim, cfg.hidden), cfg.weight_init)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(cfg.alpha)))
        self.target_entropy = (cfg.target_entropy if cfg.target_entropy is not None
                               else -float(act_dim))
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=cfg.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=cfg.alpha_lr)

    @classmethod
    def from_dataset(cls, dataset, cfg=None):
        """The agent sized for `dataset` (every agent has this constructor)."""
        return cls(dataset.obs_dim, dataset.act_dim, cfg)

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp().detach()

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

    def critic_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        q = self.critic(batch["obs"], batch["actions"])
        loss = F.mse_loss(q, self.td_target(batch).expand_as(q), reduction="none").mean(1).sum()
        return loss, {"critic_loss": loss.item(), "q_mean": q.mean().item()}

    def actor_loss(self, obs: torch.Tensor, sample: tuple[torch.Tensor, torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, log pi) on `sample` = (actions, log-probs) from the actor (drawn here if None)."""
        act, logp = self.actor(obs) if sample is None else sample
        q = self.critic(obs, act).min(0).values
        return (self.policy_alpha * logp - q).mean(), logp

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        closs, info = self.critic_loss(batch)
        self.critic_opt.zero_grad(set_to_none=True)
        closs.backward()
        self.critic_opt.step()

        aloss, logp = self.actor_loss(batch["obs"])
        self.actor_opt.zero_grad(set_to_none=True)
        aloss.backward()
        self.actor_opt.step()
        info["actor_loss"] = aloss.item()

        if self.cfg.auto_alpha:
            alpha_loss = -(self.log_alpha * (logp.detach() + self.target_entropy)).mean()
            self.alpha_opt.zero_grad(set_to_none=True)
            alpha_loss.backward()
            self.alpha_opt.step()
        info["alpha"] = self.alpha.item()
        self.soft_update()
        return info

    @torch.no_grad()
    def soft_update(self) -> None:
        for p, tp in zip(self.critic.parameters(), self.critic_target.parameters()):
            tp.lerp_(p, self.cfg.tau)

    def training_state(self) -> dict:
        """Everything to resume training exactly: weights and optimiser moments."""
        return {"model": self.state_dict(), "actor_opt": self.actor_opt.state_dict(),
                "critic_opt": self.critic_opt.state_dict(),
                "alpha_opt": self.alpha_opt.state_dict()}

    def load_training_state(self, state: dict) -> None:
        self.load_state_dict(state["model"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.alpha_opt.load_state_dict(state["alpha_opt"])
