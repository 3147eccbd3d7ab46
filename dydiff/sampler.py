"""EDM stochastic Heun sampler with inpainting, and DyDiff's policy-injection loop.

`edm_sample` is Algorithm 2 of Karras et al. (2022) with the noise levels
sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, sigma_N = 0.
Conditioning is by inpainting: the first state and (optionally) the first L actions are written
into x after every update, so they are exactly the given values in the output. Unlike the
authors' `condition_guidance_sampler`, the conditioning is also written into the churned x_hat
before it is denoised, since training always shows the network clean conditioned entries.

`DiffusionDynamics` is the loaded model: `sample`, `inject` (policy injection), and the
dynamics-model interface `open_loop` / `policy_rollout` used by the rollout-error study.
Policy injection (Zhao et al. 2024, Alg. 1; authors' `dynamics_recursive_sampler`):
  s^0 = initial states, a^0 = pi(s^0)
  for k in 1..K:  s~ = DM(s_0, a^{k-1});  s^k = (s~ + s^{k-1}) / 2;  a^k = pi(s^k)
The authors initialise s^0 with a single-step ensemble rolled out by the policy; here the
generator only has the diffusion model, so s^0 is an action-unconditioned diffusion sample
(the model is trained with action dropout for this, see edm.py). `init='policy'` instead
conditions the first pass on pi applied to the start state repeated (no extra model needed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from harness.config import require
from dydiff.segments import Normalizer
from dydiff.edm import EDMDenoiser, apply_conditioning


@dataclass
class SamplerConfig:
    # Paper / authors' exp_specs sampler_kwargs (EDM's ImageNet stochastic settings).
    num_steps: int = 34
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    S_churn: float = 60.0
    S_min: float = 0.3699492132558657
    S_max: float = 52.241950650433864
    S_noise: float = 1.002
    batch_size: int = 4096  # trajectories per network call (memory bound, not a method setting)

    def validate(self) -> None:
        require(self.num_steps >= 1, "num_steps", f"must be >= 1, got {self.num_steps}")
        require(0 < self.sigma_min < self.sigma_max, "sigma_min",
                f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        require(self.rho > 0, "rho", f"must be > 0, got {self.rho}")
        require(self.S_churn >= 0, "S_churn", f"must be >= 0, got {self.S_churn}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")


def sigma_steps(cfg: SamplerConfig, device=None) -> torch.Tensor:
    """Karras noise levels sigma_0 = sigma_max > ... > sigma_{N-1} = sigma_min, sigma_N = 0."""
    i = torch.arange(cfg.num_steps, dtype=torch.float64)
    inv = 1.0 / cfg.rho
    denom = max(cfg.num_steps - 1, 1)
    t = (cfg.sigma_max ** inv + i / denom * (cfg.sigma_min ** inv - cfg.sigma_max ** inv)) ** cfg.rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)]).to(device=device,
                                                                   dtype=torch.float32)


@torch.no_grad()
def edm_sample(denoiser: EDMDenoiser, shape: tuple[int, int, int], obs_dim: int,
               start_state: torch.Tensor, actions: torch.Tensor | None = None,
               cfg: SamplerConfig | None = None, generator: torch.Generator | None = None
               ) -> torch.Tensor:
    """Sample normalised trajectories (B, H, D) given normalised start states (B, o) and
    optionally normalised actions (B, L, a) for the first L rows."""
    cfg = cfg or SamplerConfig()
    device = start_state.device
    t_steps = sigma_steps(cfg, device)
    randn = lambda: torch.randn(shape, device=device, generator=generator)  # noqa: E731
    cond = lambda x: apply_conditioning(x, obs_dim, start_state, actions)  # noqa: E731
    gamma_max = min(cfg.S_churn / cfg.num_steps, math.sqrt(2) - 1)
    x_next = cond(randn() * t_steps[0])
    for i in range(cfg.num_steps):  # the ODE/SDE steps are inherently sequential
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        x_cur = x_next
        gamma = gamma_max if cfg.S_min <= float(t_cur) <= cfg.S_max else 0.0
        t_hat = t_cur * (1 + gamma)
        x_hat = cond(x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * cfg.S_noise * randn())
        d_cur = (x_hat - denoiser(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < cfg.num_steps - 1:  # Heun correction (not at sigma = 0)
            x_next = cond(x_next)
            d_prime = (x_next - denoiser(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        x_next = cond(x_next)
    return x_next


def _policy(agent, states: torch.Tensor) -> torch.Tensor:
    """Deterministic policy on (N, H, o) states, one batched call over N * H."""
    n, h, o = states.shape
    with torch.no_grad():
        return agent.act(states.reshape(n * h, o), deterministic=True).reshape(n, h, -1)


class DiffusionDynamics:
    """A trained dynamics diffusion model in raw (unnormalised) state/action units."""

    def __init__(self, denoiser: EDMDenoiser, normalizer: Normalizer, obs_dim: int,
                 act_dim: int, horizon: int, sampler: SamplerConfig | None = None,
                 device: torch.device | str = "cpu", name: str = "unknown"):
        self.denoiser = denoiser.to(device).eval().requires_grad_(False)
        self.normalizer = normalizer
        self.obs_norm = normalizer.slice(slice(0, obs_dim))
        self.act_norm = normalizer.slice(slice(obs_dim, obs_dim + act_dim))
        self.obs_dim, self.act_dim, self.horizon = obs_dim, act_dim, horizon
        self.sampler = sampler or SamplerConfig()
        self.device = torch.device(device)
        self.name = name

    # -- sampling -------------------------------------------------------------------------
    def sample(self, start_obs: torch.Tensor, actions: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Trajectories from raw start states (N, o), optionally conditioned on the first L
        raw actions (N, L, a), L <= horizon -> raw (states (N, H, o), actions (N, H, a))."""
        start_obs = torch.as_tensor(start_obs, dtype=torch.float32, device=self.device)
        n = start_obs.shape[0]
        if actions is not None:
            actions = torch.as_tensor(actions, dtype=torch.float32, device=self.device)
            if actions.shape[0] != n or actions.shape[1] > self.horizon \
                    or actions.shape[2] != self.act_dim:
                raise ValueError(f"actions must be (N={n}, L<={self.horizon}, {self.act_dim}), "
                                 f"got {tuple(actions.shape)}")
        s0 = self.obs_norm.normalize(start_obs)
        a = None if actions is None else self.act_norm.normalize(actions)
        d = self.obs_dim + self.act_dim
        out = []
        bs = self.sampler.batch_size
        for lo in range(0, n, bs):  # memory-bounded chunks; each chunk is one batched sample
            hi = min(lo + bs, n)
            x = edm_sample(self.denoiser, (hi - lo, self.horizon, d), self.obs_dim, s0[lo:hi],
                           None if a is None else a[lo:hi], self.sampler, generator)
            out.append(x)
        x = self.normalizer.unnormalize(torch.cat(out))
        states, acts = x[..., :self.obs_dim], x[..., self.obs_dim:]
        # Inpainted entries are returned exactly as given (no round-off from (un)normalising).
        states[:, 0] = start_obs
        if actions is not None:
            acts[:, :actions.shape[1]] = actions
        return states, acts

    def inject(self, start_obs: torch.Tensor, agent, iterative_times: int = 2,
               average_states: bool = True, init: Literal["diffusion", "policy"] = "diffusion",
               generator: torch.Generator | None = None) -> dict:
        """Policy injection; returns states (N,H,o), actions = pi(states) (N,H,a), cond_actions
        (the actions the last states were generated with) and action_gap per iteration:
        mean ||cond_actions - pi(states)|| (index 0 = before injection)."""
        start_obs = torch.as_tensor(start_obs, dtype=torch.float32, device=self.device)
        if init == "diffusion":
            states, cond_actions = self.sample(start_obs, None, generator)
        else:
            a0 = _policy(agent, start_obs[:, None]).expand(-1, self.horizon, -1)
            states, cond_actions = self.sample(start_obs, a0, generator)
        actions = _policy(agent, states)
        gaps = [float((cond_actions - actions).norm(dim=-1).mean())]
        for _ in range(iterative_times):
            cond_actions = actions
            new_states, _ = self.sample(start_obs, cond_actions, generator)
            states = (new_states + states) / 2 if average_states else new_states
            actions = _policy(agent, states)
            gaps.append(float((cond_actions - actions).norm(dim=-1).mean()))
        return {"states": states, "actions": actions, "cond_actions": cond_actions,
                "action_gap": gaps}

    # -- dynamics-model interface (rollout-error study) ---------------------------------------
    def open_loop(self, start_obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """States after each of the given actions: (N, o), (N, T, a) -> (N, T, o).

        A horizon-H model covers H - 1 actions per sample; longer sequences are chained,
        each window starting from the previous window's last state."""
        start = torch.as_tensor(start_obs, dtype=torch.float32, device=self.device)
        actions = torch.as_tensor(actions, dtype=torch.float32, device=self.device)
        step = self.horizon - 1
        chunks = []
        for lo in range(0, actions.shape[1], step):
            acts = actions[:, lo:lo + step]
            states, _ = self.sample(start, acts)
            chunks.append(states[:, 1:acts.shape[1] + 1])
            start = chunks[-1][:, -1]
        return torch.cat(chunks, 1)

    def policy_rollout(self, start_obs: torch.Tensor, agent, H: int, iterative_times: int = 2,
                       average_states: bool = True,
                       init: Literal["diffusion", "policy"] = "diffusion") -> dict:
        """Policy-injected rollout of H transitions: dict(obs, actions, next_obs) each (N,H,.)
        plus action_gap (per injection iteration, first window). Longer than horizon - 1
        transitions are chained windows, each starting from the previous window's last state."""
        start = torch.as_tensor(start_obs, dtype=torch.float32, device=self.device)
        obs, acts, nxt, gaps = [], [], [], None
        step = self.horizon - 1
        for lo in range(0, H, step):
            k = min(step, H - lo)
            out = self.inject(start, agent, iterative_times, average_states, init)
            gaps = gaps or out["action_gap"]
            obs.append(out["states"][:, :k])
            acts.append(out["actions"][:, :k])
            nxt.append(out["states"][:, 1:k + 1])
            start = nxt[-1][:, -1]
        return {"obs": torch.cat(obs, 1), "actions": torch.cat(acts, 1),
                "next_obs": torch.cat(nxt, 1), "action_gap": gaps}
