"""Diffusion-QL (Wang et al. 2022, "Diffusion Policies as an Expressive Policy Class for Offline
Reinforcement Learning"), as its code runs it (github.com/Zhendong-Wang/
Diffusion-Policies-for-Offline-RL, "the original" below), and the DyDiff authors' variant
(github.com/FineArtz/DyDiff rlkit/algo/diff_ql.py, training/DiffusionActor.py).

The policy pi(a|s) is a T-step DDPM over actions: a noise-prediction network eps_theta(x_t, t, s)
and a beta schedule (vp, T = 5: main.py:197-198 override the classes' defaults 100 / linear).
A reverse step predicts x0_hat = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps_theta, clamps it to
the action bound, and draws x_{t-1} ~ N(mu_t(x0_hat, x_t), sigma_t^2) (no noise at t = 0);
the sample is clamped once more (agents/diffusion.py:95-145). The actor minimises

    L(theta) = L_bc + eta * L_q,   L_bc = E ||eps - eps_theta(sqrt(abar_t) a + sqrt(1-abar_t) eps, t, s)||^2
    L_q = -mean Q_i(s, a~pi) / mean |Q_j(s, a~pi)| (no grad),  (i, j) = (1, 2) or (2, 1) at random

where a~pi is the whole T-step reverse chain, differentiated through (`q_term: chain`, the
original: ql_diffusion.py:140-148), or x0_hat predicted in one step from the noised dataset
action of L_bc, same t and noise (`q_term: one_step`, the DyDiff authors' `use_pred_start`:
DiffusionActor.py:219-233, diff_ql.py:107-119). Twin critics are trained on
r + gamma (1 - d) min_i Q'_i(s', a'), a' a sample of the EMA actor (max over 10 samples per
critic first with `max_q_backup`); the EMA (0.995) moves every 5 updates from update 1000 on and
holds the initial weights before (ql_diffusion.py:79-83,102-105,158-159). The evaluation action
is one of 50 samples of the (non-EMA) actor, drawn with probability softmax(min_i Q'_i)
(ql_diffusion.py:187-194); `rollout_action` (what DyDiff's rollouts query) is one sample.

Defaults are the original's; `harness/registry.py` DIFFQL_PRESETS holds both sources' complete
settings (values and lines: baselines/reference_settings.yaml).
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
from agents.sac import adam, as_floats, fit_obs_stats, init_weights_


@dataclass
class DiffQLConfig:
    # The diffusion actor: T and schedule main.py:197-198 (vp: agents/helpers.py:57-64).
    n_timesteps: int = 5
    beta_schedule: Literal["vp", "linear"] = "vp"
    # eps_theta: [x, emb(t), s] -> 3 x 256 Mish -> a, emb = sinusoidal(16) -> 32 Mish -> 16
    # (agents/model.py:25-48; the DyDiff authors' TimeMLP is the same, DiffusionActor.py:19-53).
    actor_hidden: list[int] = field(default_factory=lambda: [256, 256, 256])
    t_dim: int = 16
    # Critics. Original: 3 x 256 Mish, one Adam for both at a fixed 3e-4 and one grad-norm clip
    # over both (ql_diffusion.py:17-34,87,133-137). Authors: 2 x 256 ReLU FlattenMLPs with EDM
    # init, one Adam each at `lr`, clipped each (diff_ql.py:43-44,95-104; diffql_script.py:101-110).
    critic_hidden: list[int] = field(default_factory=lambda: [256, 256, 256])
    critic_activation: Literal["mish", "relu"] = "mish"
    critic_init: Literal["torch", "edm"] = "torch"
    critic_optimizers: Literal["joint", "per_critic"] = "joint"
    actor_lr: float = 3e-4        # main.py hyperparameters['lr'] (per task)
    critic_lr: float = 3e-4       # original: fixed (ql_diffusion.py:87); authors: = lr
    eta: float = 1.0              # weight of L_q (per task)
    grad_norm: float = 1.0        # max grad norm (<= 0: no clipping); class default :67
    max_q_backup: bool = False    # per task (antmaze)
    max_q_samples: int = 10       # ql_diffusion.py:118-122
    # Reward transform of the original's Data_Sampler (utils/data_sampler.py:25-35): "no", or
    # antmaze's (r - 0.5) * 4 ("cql_antmaze").
    reward_tune: Literal["no", "cql_antmaze"] = "no"
    gamma: float = 0.99           # main.py:193
    tau: float = 0.005            # main.py:194
    ema_decay: float = 0.995      # ql_diffusion.py:61-63
    step_start_ema: int = 1000
    update_ema_every: int = 5
    # "chain": L_q through the whole reverse chain (original); "one_step": through x0_hat of
    # L_bc's noised action (authors' use_pred_start).
    q_term: Literal["chain", "one_step"] = "chain"
    # --lr_decay (README's command): CosineAnnealingLR(T_max = num_epochs) on both optimisers,
    # stepped once per `train` call of eval_freq x num_steps_per_epoch = 50 x 1000 updates
    # (main.py:60,84-89; ql_diffusion.py:89-91,181-183): after k steps lr_k = lr (1 +
    # cos(pi k / T_max)) / 2, i.e. >= 0.999 lr over the original's 40 steps: about constant.
    lr_decay: bool = False
    lr_decay_every: int = 50_000
    lr_decay_t_max: int = 2000
    eval_samples: int = 50        # ql_diffusion.py:189
    max_action: float = 1.0
    # Observation standardisation: original none; authors mean / (population std + 1e-6)
    # (diffql_script.py:86-95, rlkit/utils/buffer.py:472-484).
    normalize_obs: bool = False
    obs_std_eps: float = 1e-6

    def validate(self) -> None:
        require(self.n_timesteps >= 1, "n_timesteps", f"must be >= 1, got {self.n_timesteps}")
        require(self.t_dim >= 4 and self.t_dim % 2 == 0, "t_dim",
                f"must be an even number >= 4, got {self.t_dim}")
        require(all(h > 0 for h in self.actor_hidden) and self.actor_hidden, "actor_hidden",
                "widths must be positive")
        require(all(h > 0 for h in self.critic_hidden) and self.critic_hidden, "critic_hidden",
                "widths must be positive")
        require(self.actor_lr > 0 and self.critic_lr > 0, "actor_lr",
                f"learning rates must be positive, got {self.actor_lr}, {self.critic_lr}")
        require(self.eta >= 0, "eta", f"must be >= 0, got {self.eta}")
        require(self.max_q_samples >= 1, "max_q_samples", f"must be >= 1, got {self.max_q_samples}")
        require(0 < self.gamma <= 1, "gamma", f"must be in (0, 1], got {self.gamma}")
        require(0 < self.tau <= 1, "tau", f"must be in (0, 1], got {self.tau}")
        require(0 <= self.ema_decay < 1, "ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        require(self.step_start_ema >= 0, "step_start_ema",
                f"must be >= 0, got {self.step_start_ema}")
        require(self.update_ema_every >= 1, "update_ema_every",
                f"must be >= 1, got {self.update_ema_every}")
        require(self.lr_decay_every >= 1 and self.lr_decay_t_max >= 1, "lr_decay_every",
                f"lr_decay_every and lr_decay_t_max must be >= 1, got {self.lr_decay_every}, "
                f"{self.lr_decay_t_max}")
        require(self.eval_samples >= 1, "eval_samples", f"must be >= 1, got {self.eval_samples}")
        require(self.max_action > 0, "max_action", f"must be positive, got {self.max_action}")
        require(self.obs_std_eps >= 0, "obs_std_eps", f"must be >= 0, got {self.obs_std_eps}")


def vp_beta_schedule(T: int) -> torch.Tensor:
    """beta_t = 1 - exp(-b_min / T - (b_max - b_min) (2t - 1) / (2 T^2)), t = 1..T, b_min 0.1,
    b_max 10 (agents/helpers.py:57-64), float32 as the source returns it."""
    t = np.arange(1, T + 1)
    b_min, b_max = 0.1, 10.0
    alpha = np.exp(-b_min / T - 0.5 * (b_max - b_min) * (2 * t - 1) / T ** 2)
    return torch.tensor(1 - alpha, dtype=torch.float32)


def linear_beta_schedule(T: int) -> torch.Tensor:
    """np.linspace(1e-4, 2e-2, T) (agents/helpers.py:50-54)."""
    return torch.tensor(np.linspace(1e-4, 2e-2, T), dtype=torch.float32)


class SinusoidalPosEmb(nn.Module):
    """[sin(t w_k), cos(t w_k)], w_k = 10000^(-k / (d/2 - 1)), k < d/2 (helpers.py:11-23)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        w = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
        arg = t[:, None] * w[None, :]
        return torch.cat([arg.sin(), arg.cos()], -1)


class NoiseNet(nn.Module):
    """eps_theta(x_t, t, s) on the concatenation [x_t, emb(t), s] (agents/model.py:12-48)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int], t_dim: int):
        super().__init__()
        self.time_mlp = nn.Sequential(SinusoidalPosEmb(t_dim), nn.Linear(t_dim, 2 * t_dim),
                                      nn.Mish(), nn.Linear(2 * t_dim, t_dim))
        self.net = mlp(act_dim + t_dim + obs_dim, act_dim, hidden, activation=nn.Mish)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t_emb, s], -1))


class DiffusionActor(nn.Module):
    """The DDPM over actions with its schedule as buffers (agents/diffusion.py:19-69)."""

    def __init__(self, obs_dim: int, act_dim: int, cfg: DiffQLConfig):
        super().__init__()
        self.act_dim, self.T, self.max_action = act_dim, cfg.n_timesteps, cfg.max_action
        self.eps_net = NoiseNet(obs_dim, act_dim, cfg.actor_hidden, cfg.t_dim)
        betas = (vp_beta_schedule if cfg.beta_schedule == "vp" else linear_beta_schedule)(self.T)
        abar = torch.cumprod(1 - betas, 0)
        abar_prev = torch.cat([torch.ones_like(abar[:1]), abar[:-1]])
        post_var = betas * (1 - abar_prev) / (1 - abar)
        for name, value in {
                "betas": betas, "sqrt_abar": abar.sqrt(), "sqrt_one_minus_abar": (1 - abar).sqrt(),
                "sqrt_recip_abar": (1 / abar).sqrt(), "sqrt_recipm1_abar": (1 / abar - 1).sqrt(),
                "post_log_var": post_var.clamp(min=1e-20).log(),
                "post_coef_x0": betas * abar_prev.sqrt() / (1 - abar),
                "post_coef_xt": (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)}.items():
            self.register_buffer(name, value)

    def time_embeddings(self, t: torch.Tensor) -> torch.Tensor:
        return self.eps_net.time_mlp(t.float())

    def x0_hat(self, x_t: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
        """x0 predicted from eps, clamped to the action bound (diffusion.py:73-84,98-99)."""
        x0 = self.sqrt_recip_abar[t] * x_t - self.sqrt_recipm1_abar[t] * eps
        return x0.clamp(-self.max_action, self.max_action)

    def sample(self, s: torch.Tensor) -> torch.Tensor:
        """One action per row of s through the T-step reverse chain (differentiable: the
        original's Q term backpropagates through it; callers wrap it in no_grad otherwise)."""
        n = s.shape[0]
        x = torch.randn(n, self.act_dim, device=s.device, dtype=s.dtype)
        t_emb = self.time_embeddings(torch.arange(self.T, device=s.device))  # (T, t_dim)
        for i in reversed(range(self.T)):
            eps = self.eps_net(x, t_emb[i].expand(n, -1), s)
            x0 = self.x0_hat(x, i, eps)
            mean = self.post_coef_x0[i] * x0 + self.post_coef_xt[i] * x
            noise = torch.randn_like(x)  # drawn at t = 0 too, as the source does, unused
            x = mean + (i > 0) * (0.5 * self.post_log_var[i]).exp() * noise
        return x.clamp(-self.max_action, self.max_action)

    def bc_loss(self, a: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L_bc (mean over rows and action dims, diffusion.py:160-179; t drawn before the noise)
        and the one-step x0_hat of the same noised action (DiffusionActor.py:219-233)."""
        t = torch.randint(0, self.T, (a.shape[0],), device=a.device)
        noise = torch.randn_like(a)
        x_t = self.sqrt_abar[t, None] * a + self.sqrt_one_minus_abar[t, None] * noise
        eps = self.eps_net(x_t, self.time_embeddings(t), s)
        return F.mse_loss(eps, noise), self.x0_hat(x_t, t[:, None], eps)


class DiffQL(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, cfg: DiffQLConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or DiffQLConfig()
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.normalizer = Standardizer(obs_dim, eps=cfg.obs_std_eps)
        self.actor = DiffusionActor(obs_dim, act_dim, cfg)
        # The EMA copy is taken now and holds these initial weights until step_start_ema.
        self.ema_actor = copy.deepcopy(self.actor).requires_grad_(False)
        act = {"mish": nn.Mish, "relu": nn.ReLU}[cfg.critic_activation]
        self.critics = nn.ModuleList(
            init_weights_(mlp(obs_dim + act_dim, 1, cfg.critic_hidden, activation=act),
                          cfg.critic_init) for _ in range(2))
        self.critics_target = copy.deepcopy(self.critics).requires_grad_(False)
        self.actor_opt = adam(self.actor.parameters(), cfg.actor_lr)
        groups = ([list(self.critics.parameters())] if cfg.critic_optimizers == "joint"
                  else [list(q.parameters()) for q in self.critics])
        self.critic_opts = [adam(g, cfg.critic_lr) for g in groups]
        self.total_it = 0

    @classmethod
    def from_dataset(cls, dataset, cfg: DiffQLConfig | None = None) -> "DiffQL":
        agent = cls(dataset.obs_dim, dataset.act_dim, cfg)
        if agent.cfg.normalize_obs:
            fit_obs_stats(agent.normalizer, dataset.observations, agent.cfg.obs_std_eps)
        return agent

    # ---- critics ----
    @staticmethod
    def q(critics: nn.ModuleList, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """(2, N): Q1 and Q2 of (s, a)."""
        x = torch.cat([s, a], -1)
        return torch.stack([q(x).squeeze(-1) for q in critics])

    @torch.no_grad()
    def td_target(self, s2: torch.Tensor, r: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """r + gamma (1 - d) min_i Q'_i(s', a'), a' from the EMA actor; with max_q_backup the
        max over max_q_samples actions per critic before the min (ql_diffusion.py:117-129)."""
        k = self.cfg.max_q_samples if self.cfg.max_q_backup else 1
        s2k = s2.repeat_interleave(k, 0)
        q2 = self.q(self.critics_target, s2k, self.ema_actor.sample(s2k))
        next_q = q2.view(2, -1, k).amax(-1).min(0).values
        return r + self.cfg.gamma * (1 - d) * next_q

    def _clip(self, params) -> None:
        if self.cfg.grad_norm > 0:
            nn.utils.clip_grad_norm_(params, max_norm=self.cfg.grad_norm)

    # ---- update ----
    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        cfg = self.cfg
        self.total_it += 1
        s, a = self.normalizer(batch["obs"]), batch["actions"]
        r = batch["rewards"] if cfg.reward_tune == "no" else (batch["rewards"] - 0.5) * 4.0
        target = self.td_target(self.normalizer(batch["next_obs"]), r, batch["terminals"])
        q = self.q(self.critics, s, a)
        critic_losses = ((q - target) ** 2).mean(1)                    # per critic
        for opt in self.critic_opts:
            opt.zero_grad(set_to_none=True)
        critic_losses.sum().backward()   # each critic's gradient is its own loss's
        if cfg.critic_optimizers == "joint":
            self._clip(self.critics.parameters())
        else:
            for critic in self.critics:
                self._clip(critic.parameters())
        for opt in self.critic_opts:
            opt.step()

        bc_loss, x0_one_step = self.actor.bc_loss(a, s)
        new_a = x0_one_step if cfg.q_term == "one_step" else self.actor.sample(s)
        # The critic whose mean is maximised: a host-side draw, as the source's np.random
        # (no device sync); torch's CPU generator, which checkpoints save and restore.
        i = 0 if torch.rand(()) > 0.5 else 1
        x = torch.cat([s, new_a], -1)
        self.critics.requires_grad_(False)  # L_q trains the actor only
        q_i = self.critics[i](x).squeeze(-1)
        with torch.no_grad():  # the scale is not differentiated: no backward through Q_j
            q_j = self.critics[1 - i](x).squeeze(-1)
        self.critics.requires_grad_(True)
        q_loss = -q_i.mean() / q_j.abs().mean()
        actor_loss = bc_loss + cfg.eta * q_loss
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self._clip(self.actor.parameters())
        self.actor_opt.step()

        # The source's step counter is total_it - 1 here (it counts after the update).
        step = self.total_it - 1
        if step % cfg.update_ema_every == 0 and step >= cfg.step_start_ema:
            self.ema_step()
        self.soft_update()
        if cfg.lr_decay and self.total_it % cfg.lr_decay_every == 0:
            self.set_lr_factor(self.total_it // cfg.lr_decay_every)
        return as_floats({"critic_loss": critic_losses.detach().sum(), "bc_loss": bc_loss.detach(),
                          "q_loss": q_loss.detach(), "actor_loss": actor_loss.detach(),
                          "q_mean": q.detach().mean()})

    @torch.no_grad()
    def ema_step(self) -> None:
        """ema <- decay * ema + (1 - decay) * actor (helpers.py:100-116)."""
        ema, cur = list(self.ema_actor.parameters()), list(self.actor.parameters())
        torch._foreach_mul_(ema, self.cfg.ema_decay)
        torch._foreach_add_(ema, cur, alpha=1 - self.cfg.ema_decay)

    @torch.no_grad()
    def soft_update(self) -> None:
        torch._foreach_lerp_(list(self.critics_target.parameters()),
                             list(self.critics.parameters()), self.cfg.tau)

    def set_lr_factor(self, k: int) -> None:
        """CosineAnnealingLR's lr after k steps (eta_min 0), in closed form."""
        factor = (1 + math.cos(math.pi * k / self.cfg.lr_decay_t_max)) / 2
        for opt, lr in [(self.actor_opt, self.cfg.actor_lr),
                        *[(o, self.cfg.critic_lr) for o in self.critic_opts]]:
            for group in opt.param_groups:
                group["lr"] = lr * factor

    # ---- actions ----
    @torch.no_grad()
    def act(self, obs: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        """The evaluation action (both modes: the source's is stochastic): per row, eval_samples
        actor samples, one drawn with probability softmax(min_i Q'_i) (ql_diffusion.py:187-194)."""
        n, k = obs.shape[0], self.cfg.eval_samples
        s = self.normalizer(obs).repeat_interleave(k, 0)
        a = self.actor.sample(s)
        q = self.q(self.critics_target, s, a).min(0).values.view(n, k)
        idx = torch.multinomial(F.softmax(q, -1), 1).squeeze(-1)
        return a.view(n, k, -1)[torch.arange(n, device=obs.device), idx]

    @torch.no_grad()
    def rollout_action(self, obs: torch.Tensor) -> torch.Tensor:
        """What a model rollout feeds the dynamics model: one reverse-chain sample of the
        (non-EMA) actor (DyDiff rlkit/trainer.py:254 -> DiffusionActor.forward:235-242)."""
        return self.actor.sample(self.normalizer(obs))

    # ---- resume ----
    def training_state(self) -> dict:
        return {"model": self.state_dict(), "actor_opt": self.actor_opt.state_dict(),
                "critic_opts": [o.state_dict() for o in self.critic_opts],
                "total_it": self.total_it}

    def load_training_state(self, state: dict) -> None:
        self.load_state_dict(state["model"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        for opt, s in zip(self.critic_opts, state["critic_opts"], strict=True):
            opt.load_state_dict(s)
        self.total_it = state["total_it"]
