"""TD3+BC (Fujimoto & Gu 2021, "A Minimalist Approach to Offline RL"), CORL's defaults.

pi = argmax_pi E[ lambda * Q(s, pi(s)) - (pi(s) - a)^2 ],  lambda = alpha / (mean |Q(s, pi(s))|)
on top of TD3 (twin critics, target policy smoothing, delayed actor and target updates).
Observations are standardised with the *real* dataset's mean/std, held inside the agent as
buffers, so `act` and `update` take raw observations (model rollouts included).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness.config import require
from harness.nets import Standardizer, mlp
from agents.sac import TwinQ


@dataclass
class TD3BCConfig:
    hidden: list[int] = field(default_factory=lambda: [256, 256])
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    gamma: float = 0.99
    tau: float = 0.005
    alpha: float = 2.5          # weight of the Q term relative to behaviour cloning
    policy_noise: float = 0.2   # target policy smoothing std ...
    noise_clip: float = 0.5     # ... and its clip
    policy_freq: int = 2        # actor and target networks update every `policy_freq` steps
    max_action: float = 1.0
    normalize_obs: bool = True
    obs_std_eps: float = 1e-3   # CORL adds 1e-3 to the std

    def validate(self) -> None:
        require(0 < self.gamma <= 1, "gamma", f"must be in (0, 1], got {self.gamma}")
        require(0 < self.tau <= 1, "tau", f"must be in (0, 1], got {self.tau}")
        require(self.alpha > 0, "alpha", f"must be positive, got {self.alpha}")
        require(self.policy_freq >= 1, "policy_freq", f"must be >= 1, got {self.policy_freq}")
        require(self.policy_noise >= 0 and self.noise_clip >= 0, "policy_noise",
                "noise and clip must be non-negative")
        require(all(h > 0 for h in self.hidden), "hidden", "widths must be positive")


def smoothed_target_action(target_action: torch.Tensor, noise: torch.Tensor,
                           cfg: TD3BCConfig) -> torch.Tensor:
    """TD3's target policy smoothing: a' = clip(pi'(s') + clip(noise, -c, c), -max, max)."""
    eps = noise.clamp(-cfg.noise_clip, cfg.noise_clip)
    return (target_action + eps).clamp(-cfg.max_action, cfg.max_action)


def td3bc_actor_loss(q: torch.Tensor, pi: torch.Tensor, actions: torch.Tensor, alpha: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """-lambda * mean Q(s, pi(s)) + mean (pi(s) - a)^2 with lambda = alpha / mean|Q| (no grad)."""
    lmbda = alpha / q.abs().mean().detach()
    return -lmbda * q.mean() + F.mse_loss(pi, actions), lmbda


class TD3BC(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, cfg: TD3BCConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or TD3BCConfig()
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.normalizer = Standardizer(obs_dim, eps=cfg.obs_std_eps)
        self.actor = mlp(obs_dim, act_dim, cfg.hidden, out_activation=nn.Tanh())
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic = TwinQ(obs_dim, act_dim, cfg.hidden)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=cfg.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr)
        self.total_it = 0

    @classmethod
    def from_dataset(cls, dataset, cfg: TD3BCConfig | None = None) -> "TD3BC":
        agent = cls(dataset.obs_dim, dataset.act_dim, cfg)
        agent.set_obs_stats(dataset.observations)
        return agent

    def set_obs_stats(self, observations: np.ndarray | torch.Tensor) -> None:
        """Fix the observation standardisation to the real dataset's mean/std (if enabled)."""
        if not self.cfg.normalize_obs:
            return
        obs = torch.as_tensor(np.asarray(observations), dtype=torch.float32)
        self.normalizer.mean.copy_(obs.mean(0))
        # CORL: std + eps (population std, as numpy computes it).
        self.normalizer.std.copy_(obs.std(0, correction=0) + self.cfg.obs_std_eps)

    def pi(self, obs_raw: torch.Tensor) -> torch.Tensor:
        return self.cfg.max_action * self.actor(self.normalizer(obs_raw))

    @torch.no_grad()
    def act(self, obs: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        """Deterministic policy on raw observations (`deterministic` is accepted for the
        interface; TD3+BC's policy has no stochastic mode)."""
        return self.pi(obs)

    def td_target(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            s2 = self.normalizer(batch["next_obs"])
            a_target = self.cfg.max_action * self.actor_target(s2)
            noise = torch.randn_like(a_target) * self.cfg.policy_noise
            a2 = smoothed_target_action(a_target, noise, self.cfg)
            next_q = self.critic_target(s2, a2).min(0).values
            return batch["rewards"] + self.cfg.gamma * (1 - batch["terminals"]) * next_q

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.total_it += 1
        s = self.normalizer(batch["obs"])
        target = self.td_target(batch)
        q = self.critic(s, batch["actions"])                       # (2, B)
        critic_loss = F.mse_loss(q, target.expand_as(q), reduction="none").mean(1).sum()
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()
        info = {"critic_loss": critic_loss.item(), "q_mean": q.mean().item()}

        if self.total_it % self.cfg.policy_freq == 0:  # delayed actor + target updates
            pi = self.cfg.max_action * self.actor(s)
            q_pi = self.critic.q1(torch.cat([s, pi], -1)).squeeze(-1)
            actor_loss, lmbda = td3bc_actor_loss(q_pi, pi, batch["actions"], self.cfg.alpha)
            self.actor_opt.zero_grad(set_to_none=True)
            actor_loss.backward()
            self.actor_opt.step()
            self.soft_update()
            info.update(actor_loss=actor_loss.item(), lmbda=lmbda.item())
        return info

    @torch.no_grad()
    def soft_update(self) -> None:
        for net, target in ((self.critic, self.critic_target), (self.actor, self.actor_target)):
            for p, tp in zip(net.parameters(), target.parameters()):
                tp.lerp_(p, self.cfg.tau)

    def training_state(self) -> dict:
        return {"model": self.state_dict(), "actor_opt": self.actor_opt.state_dict(),
                "critic_opt": self.critic_opt.state_dict(), "total_it": self.total_it}

    def load_training_state(self, state: dict) -> None:
        self.load_state_dict(state["model"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.total_it = state["total_it"]
