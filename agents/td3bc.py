"""TD3+BC (Fujimoto & Gu 2021, "A Minimalist Approach to Offline RL"), CORL's defaults.

pi = argmax_pi E[ lambda * Q(s, pi(s)) - (pi(s) - a)^2 ],  lambda = alpha / (mean |Q(s, pi(s))|)
on top of TD3 (twin critics, target policy smoothing, delayed actor and target updates).
Observations are standardised with the *real* dataset's mean/std, held inside the agent as
buffers, so `act` and `update` take raw observations (model rollouts included).

The defaults are CORL's TD3+BC (algorithms/offline/td3_bc.py). The DyDiff authors' variant
(FineArtz/DyDiff rlkit/algo/td3_bc.py, run_scripts/td3bc_script.py) is selected by
    actor: tanh_gaussian, target_smoothing: false, bc_weight: 0.5, obs_std_eps: 1.0e-6,
    weight_init: edm
(alpha 2.5, policy_freq 2, tau 0.005, lr 3e-4, 2 x 256, gamma 0.99 already match). Their
stochastic actor is trained on reparameterised samples and evaluated with tanh(mean), which is
what `act(obs, deterministic=True)` returns.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness.config import require
from harness.nets import Standardizer, mlp
from agents.sac import (TanhGaussianActor, TwinQ, adam, as_floats, critic_opt_state,
                        fit_obs_stats, init_weights_)


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
    # Added to the population std. CORL: 1e-3 (td3_bc.py:63-66,403); DyDiff authors: 1e-6
    # (rlkit/utils/buffer.py:453-483, run_scripts/td3bc_script.py:86-95).
    obs_std_eps: float = 1e-3
    # "deterministic": CORL's tanh MLP actor (td3_bc.py:225-246). "tanh_gaussian": the DyDiff
    # authors' TanhGaussianPolicy, trained (actor loss and target action) on rsample()d
    # tanh-Gaussian actions and evaluated with tanh(mean) (run_scripts/td3bc_script.py:111-115;
    # rlkit/algo/td3_bc.py:76,104; rlkit/policy.py:28-48).
    actor: Literal["deterministic", "tanh_gaussian"] = "deterministic"
    # Log-std clamp of the tanh_gaussian actor; authors [-20, 2] (rlkit/policy.py:12-13,32).
    log_std_min: float = -20.0
    log_std_max: float = 2.0
    # TD3's target policy smoothing, clip(pi'(s') + clip(N(0, policy_noise), +-noise_clip)).
    # CORL: on (td3_bc.py:312-320). Authors: off; policy_noise/noise_clip are stored but
    # unused, and the target action is pi'(s') itself, a sample when the actor is
    # tanh_gaussian (rlkit/algo/td3_bc.py:21-22,36-37,75-86).
    target_smoothing: bool = True
    # Weight of the behaviour-cloning MSE in the actor loss. CORL 1.0 (td3_bc.py:349);
    # authors 0.5 (rlkit/algo/td3_bc.py:114).
    bc_weight: float = 1.0
    # Linear init: "torch" (CORL) or "edm", the authors' sqrt(1/fan_in) * N(0, 1) weights and
    # zero biases (training/networks.py:28-53,938-980).
    weight_init: Literal["torch", "edm"] = "torch"

    def validate(self) -> None:
        require(0 < self.gamma <= 1, "gamma", f"must be in (0, 1], got {self.gamma}")
        require(0 < self.tau <= 1, "tau", f"must be in (0, 1], got {self.tau}")
        require(self.alpha > 0, "alpha", f"must be positive, got {self.alpha}")
        require(self.policy_freq >= 1, "policy_freq", f"must be >= 1, got {self.policy_freq}")
        require(self.policy_noise >= 0 and self.noise_clip >= 0, "policy_noise",
                "noise and clip must be non-negative")
        require(all(h > 0 for h in self.hidden), "hidden", "widths must be positive")
        require(self.bc_weight >= 0, "bc_weight", f"must be >= 0, got {self.bc_weight}")
        require(self.obs_std_eps >= 0, "obs_std_eps", f"must be >= 0, got {self.obs_std_eps}")
        require(self.log_std_min < self.log_std_max, "log_std_min",
                f"must be below log_std_max, got [{self.log_std_min}, {self.log_std_max}]")


def smoothed_target_action(target_action: torch.Tensor, noise: torch.Tensor,
                           cfg: TD3BCConfig) -> torch.Tensor:
    """TD3's target policy smoothing: a' = clip(pi'(s') + clip(noise, -c, c), -max, max)."""
    eps = noise.clamp(-cfg.noise_clip, cfg.noise_clip)
    return (target_action + eps).clamp(-cfg.max_action, cfg.max_action)


def td3bc_actor_loss(q: torch.Tensor, pi: torch.Tensor, actions: torch.Tensor, alpha: float,
                     bc_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """-lambda * mean Q(s, pi(s)) + bc_weight * mean (pi(s) - a)^2 with
    lambda = alpha / mean|Q| (no grad)."""
    lmbda = alpha / q.abs().mean().detach()
    return -lmbda * q.mean() + bc_weight * F.mse_loss(pi, actions), lmbda


class TD3BC(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, cfg: TD3BCConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or TD3BCConfig()
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.normalizer = Standardizer(obs_dim, eps=cfg.obs_std_eps)
        if cfg.actor == "tanh_gaussian":
            actor = TanhGaussianActor(obs_dim, act_dim, cfg.hidden, cfg.log_std_min,
                                      cfg.log_std_max)
        else:
            actor = mlp(obs_dim, act_dim, cfg.hidden, out_activation=nn.Tanh())
        self.actor = init_weights_(actor, cfg.weight_init)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic = TwinQ(obs_dim, act_dim, cfg.hidden,
                            init=lambda q: init_weights_(q, cfg.weight_init))
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_opt = adam(self.actor.parameters(), cfg.actor_lr)
        self.critic_opt = adam(self.critic.parameters(), cfg.critic_lr)
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
        fit_obs_stats(self.normalizer, observations, self.cfg.obs_std_eps)

    def policy(self, net: nn.Module, s: torch.Tensor, deterministic: bool = False
               ) -> torch.Tensor:
        """Action of actor `net` (the actor or its target) on *standardised* observations:
        the tanh MLP's output, or for tanh_gaussian a reparameterised sample (tanh(mean) when
        deterministic)."""
        if self.cfg.actor == "tanh_gaussian":
            return self.cfg.max_action * net(s, deterministic)[0]
        return self.cfg.max_action * net(s)

    def pi(self, obs_raw: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        return self.policy(self.actor, self.normalizer(obs_raw), deterministic)

    @torch.no_grad()
    def act(self, obs: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        """Policy on raw observations. The deterministic actor ignores `deterministic`; the
        tanh_gaussian one returns tanh(mean) (its evaluation action) or, if false, a sample."""
        return self.pi(obs, deterministic)

    def target_action(self, s2: torch.Tensor) -> torch.Tensor:
        """a' for the TD target on standardised next observations (no grad)."""
        a_target = self.policy(self.actor_target, s2)
        if not self.cfg.target_smoothing:
            return a_target
        noise = torch.randn_like(a_target) * self.cfg.policy_noise
        return smoothed_target_action(a_target, noise, self.cfg)

    def td_target(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            s2 = self.normalizer(batch["next_obs"])
            a2 = self.target_action(s2)
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
        info = {"critic_loss": critic_loss.detach(), "q_mean": q.detach().mean()}

        if self.total_it % self.cfg.policy_freq == 0:  # delayed actor + target updates
            pi = self.policy(self.actor, s)  # a sample for tanh_gaussian
            # Q1 only, its weights detached: this loss trains the actor alone.
            q_pi = self.critic(s, pi, members=slice(0, 1), detach=True)[0]
            actor_loss, lmbda = td3bc_actor_loss(q_pi, pi, batch["actions"], self.cfg.alpha,
                                                 self.cfg.bc_weight)
            self.actor_opt.zero_grad(set_to_none=True)
            actor_loss.backward()
            self.actor_opt.step()
            self.soft_update()
            info.update(actor_loss=actor_loss.detach(), lmbda=lmbda)
        return as_floats(info)

    @torch.no_grad()
    def soft_update(self) -> None:
        nets, targets = (self.critic, self.actor), (self.critic_target, self.actor_target)
        torch._foreach_lerp_([p for t in targets for p in t.parameters()],
                             [p for n in nets for p in n.parameters()], self.cfg.tau)

    def training_state(self) -> dict:
        return {"model": self.state_dict(), "actor_opt": self.actor_opt.state_dict(),
                "critic_opt": self.critic_opt.state_dict(), "total_it": self.total_it}

    def load_training_state(self, state: dict) -> None:
        self.load_state_dict(state["model"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(critic_opt_state(self.critic, state["critic_opt"]))
        self.total_it = state["total_it"]
