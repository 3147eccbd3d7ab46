"""EDM preconditioning and training loss (Karras et al. 2022, "Elucidating the Design Space...").

D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma)), with
  c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),
  c_in = 1 / sqrt(sigma^2 + sd^2),   c_noise = ln(sigma) / 4,
trained with ln(sigma) ~ N(P_mean, P_std^2) and weight lambda = (sigma^2 + sd^2) / (sigma sd)^2,
so that lambda * c_out^2 = 1: every noise level has unit-variance effective targets.

DyDiff trains the denoiser with inpainting conditioning (authors' `EDMLoss` with use_cond and
cond_on_action, training/loss.py:91-97): the noisy input's first state, and the actions, are
replaced by their clean values. The authors always condition on the actions
(`action_cond_prob: 1`); below 1, that fraction of the batch keeps noisy actions so the same
model can also sample action-free trajectories (init 'diffusion' / 'policy', see sampler.py).
"""
from __future__ import annotations

import torch
from torch import nn


class EDMDenoiser(nn.Module):
    """Wraps a network F(x, c_noise) into the preconditioned denoiser D(x; sigma)."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002,
                 sigma_max: float = 80.0):
        super().__init__()
        self.net = net
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, sigma_min, sigma_max

    def c_skip(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)

    def c_out(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1.0 / (sigma ** 2 + self.sigma_data ** 2).sqrt()

    @staticmethod
    def c_noise(sigma: torch.Tensor) -> torch.Tensor:
        return sigma.log() / 4

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """x (B, H, D), sigma scalar or (B,) -> denoised estimate (B, H, D)."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        s = sigma[:, None, None]
        f = self.net(self.c_in(s) * x, self.c_noise(sigma))
        return self.c_skip(s) * x + self.c_out(s) * f


def apply_conditioning(x: torch.Tensor, obs_dim: int, start_state: torch.Tensor | None,
                       actions: torch.Tensor | None = None,
                       action_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Inpaint (out of place): x[:, 0, :obs_dim] = start_state; x[:, :L, obs_dim:] = actions.

    actions (B, L, a) with L <= H conditions the first L rows; `action_rows` (B,) bool limits the
    action conditioning to some batch items (training with action dropout).
    """
    x = x.clone()
    if start_state is not None:
        x[:, 0, :obs_dim] = start_state
    if actions is not None:
        length = actions.shape[1]
        if action_rows is None:
            x[:, :length, obs_dim:] = actions
        else:
            keep = action_rows[:, None, None]
            x[:, :length, obs_dim:] = torch.where(keep, actions, x[:, :length, obs_dim:])
    return x


def edm_loss(denoiser: EDMDenoiser, x0: torch.Tensor, mask: torch.Tensor, obs_dim: int,
             P_mean: float = -1.2, P_std: float = 1.2, action_cond_prob: float = 1.0,
             loss_form: str = "sum") -> torch.Tensor:
    """EDM's weighted denoising error, two forms:

    sum (the authors', training/loss.py:98-99 and training_loop.py:261): the weighted squared
        error of every entry in `mask`, conditioned ones included, summed per sample and
        averaged over the batch;
    masked_mean (this harness's former loss): the mean over the entries the model has to
        generate: `mask` without the conditioned ones (the first state, actions where
        conditioned), which equal the input and are overwritten at sampling time.

    x0 (B, H, D) clean normalised segments; mask (B, H, D) 1 for entries in the loss (all ones
    with the authors' constant padding, which they train on; 0 on repeat-padding).
    """
    if loss_form not in ("sum", "masked_mean"):
        raise ValueError(f"loss_form must be 'sum' or 'masked_mean', got {loss_form!r}")
    b = x0.shape[0]
    sigma = (torch.randn(b, device=x0.device) * P_std + P_mean).exp()
    s = sigma[:, None, None]
    noisy = x0 + torch.randn_like(x0) * s
    cond_act = torch.rand(b, device=x0.device) < action_cond_prob
    noisy = apply_conditioning(noisy, obs_dim, x0[:, 0, :obs_dim], x0[:, :, obs_dim:], cond_act)
    denoised = denoiser(noisy, sigma)
    if loss_form == "sum":
        return (denoiser.loss_weight(s) * (denoised - x0) ** 2 * mask).sum() / b
    gen = mask.clone()
    gen[:, 0, :obs_dim] = 0
    gen[:, :, obs_dim:] *= (~cond_act).float()[:, None, None]
    err = denoiser.loss_weight(s) * (denoised - x0) ** 2 * gen
    return err.sum() / gen.sum().clamp_min(1.0)
