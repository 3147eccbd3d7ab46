"""Train the dynamics diffusion model: EDM on [state, action] segments with a temporal U-Net.

Defaults follow the authors' code (FineArtz/DyDiff: README command, train.py, training_loop.py):
horizon 100, batch 8, 4 Mimg (500k steps), Adam lr 1e-3 (betas 0.9/0.999, eps 1e-8) with EDM's
linear lr ramp-up over 10M samples, EDM EMA with a 500 kimg half-life and 0.05 ramp-up ratio,
non-finite gradients zeroed (EDM's nan_to_num) instead of clipping (grad_clip is optional).
The U-Net is the authors' TemporalUnet (Decision Diffuser) default: dim 128, dim_mults (1, 4, 8).

Outputs in out_dir: model.pt (EMA weights, config, normaliser), checkpoint.pt (exact resume:
weights, EMA, optimiser, RNG, step, metrics so far), metrics.parquet (step, loss, lr,
wall_time_s).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
from tqdm.auto import tqdm

from harness.config import from_dict, require
from harness.data.dataset import Dataset
from dydiff.segments import Normalizer, Segments, make_segments
from dydiff.edm import EDMDenoiser, edm_loss
from dydiff.sampler import (SAMPLER_PRESETS, DiffusionDynamics, SamplerConfig,
                            sampler_config)
from dydiff.unet import TemporalUnet
from harness.levers import USED_BY, autocast, compiled, levers, tf32_flags
from harness.checkpoint import CHECKPOINT, Checkpointer, load_checkpoint, save_checkpoint
from harness.runtime import start_training

MODEL = "model.pt"


@dataclass
class DiffusionConfig:
    horizon: int = 100
    dim: int = 128
    dim_mults: list[int] = field(default_factory=lambda: [1, 4, 8])
    kernel_size: int = 5
    normalizer: Literal["limits", "gaussian"] = "limits"
    sigma_data: float = 0.5
    P_mean: float = -1.2
    P_std: float = 1.2
    # The authors always condition on the actions (training/loss.py:95-97, README
    # `--cond_on_action True`); below 1, that fraction of each batch is action-conditioned and
    # the rest teaches action-free sampling (needed by policy.rollout.init 'diffusion').
    action_cond_prob: float = 1.0
    # sum (authors, training/loss.py:98-99, training_loop.py:261): every entry, conditioned ones
    # and padding included, summed per sample, averaged over the batch; masked_mean (former):
    # mean over generated, unpadded entries (dydiff/edm.py edm_loss).
    loss_form: Literal["sum", "masked_mean"] = "sum"
    # Episodes shorter than the horizon (dydiff/segments.py): constant (authors, training/
    # dataset.py:332-341): observation/action rows only, padded with -1 - 1e-4 in every
    # normalised channel and trained on; repeat (former): a final [s_L, 0] row, the last
    # state repeated with masked actions, padding left out of the loss.
    padding: Literal["constant", "repeat"] = "constant"
    lr: float = 1e-3
    lr_rampup_kimg: float = 10_000.0
    batch_size: int = 8
    train_steps: int = 500_000
    ema_halflife_kimg: float = 500.0
    ema_rampup_ratio: float | None = 0.05
    grad_clip: float | None = None
    log_every: int = 1000
    checkpoint_every: int = 10_000
    # A mapping of SamplerConfig fields, or a preset name ("authors", "fast": dydiff/
    # sampler.py SAMPLER_PRESETS), resolved to a SamplerConfig on construction.
    sampler: SamplerConfig | str = field(default_factory=SamplerConfig)

    def __post_init__(self) -> None:
        if isinstance(self.sampler, str) and self.sampler in SAMPLER_PRESETS:
            self.sampler = sampler_config(self.sampler)

    def validate(self) -> None:
        require(isinstance(self.sampler, SamplerConfig), "sampler",
                f"unknown sampler preset {self.sampler!r}; known: {sorted(SAMPLER_PRESETS)} "
                f"(or a mapping of sampler settings)")
        require(self.horizon >= 2, "horizon", f"must be >= 2, got {self.horizon}")
        require(self.dim >= 8 and self.dim % 8 == 0, "dim",
                f"must be a positive multiple of 8 (GroupNorm groups), got {self.dim}")
        require(len(self.dim_mults) >= 1 and all(m >= 1 for m in self.dim_mults), "dim_mults",
                f"must be a non-empty list of positive ints, got {self.dim_mults}")
        require(self.kernel_size % 2 == 1, "kernel_size", f"must be odd, got {self.kernel_size}")
        require(0.0 <= self.action_cond_prob <= 1.0, "action_cond_prob",
                f"must be in [0, 1], got {self.action_cond_prob}")
        for key in ("sigma_data", "P_std", "lr"):
            require(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")
        for key in ("batch_size", "train_steps", "log_every", "checkpoint_every"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        require(self.lr_rampup_kimg >= 0, "lr_rampup_kimg", "must be >= 0")
        require(self.ema_halflife_kimg >= 0, "ema_halflife_kimg", "must be >= 0")
        require(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be > 0 or null")


def build_denoiser(cfg: DiffusionConfig, transition_dim: int) -> EDMDenoiser:
    net = TemporalUnet(transition_dim, cfg.dim, cfg.dim_mults, cfg.kernel_size)
    return EDMDenoiser(net, cfg.sigma_data, cfg.sampler.sigma_min, cfg.sampler.sigma_max)


def ema_beta(step: int, cfg: DiffusionConfig) -> float:
    """EDM's EMA decay before update `step` (0-based): 0.5 ** (batch / half-life in samples),
    the half-life ramping up as ratio * samples seen so far."""
    halflife = cfg.ema_halflife_kimg * 1000
    if cfg.ema_rampup_ratio is not None:
        halflife = min(halflife, step * cfg.batch_size * cfg.ema_rampup_ratio)
    return 0.5 ** (cfg.batch_size / max(halflife, 1e-8))


def lr_at(step: int, cfg: DiffusionConfig) -> float:
    """EDM's linear learning-rate ramp-up over lr_rampup_kimg thousand samples."""
    if cfg.lr_rampup_kimg <= 0:
        return cfg.lr
    return cfg.lr * min((step + 1) * cfg.batch_size / (cfg.lr_rampup_kimg * 1000), 1.0)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * net, for every parameter (buffers copied): one
    multi-tensor lerp (and copy) instead of one launch per tensor (the same numbers as a
    per-tensor `lerp_`)."""
    torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1.0 - beta)
    buffers = list(ema.buffers())
    if buffers:
        torch._foreach_copy_(buffers, list(net.buffers()))


@torch.no_grad()
def repair_nonfinite_grads(params) -> bool:
    """EDM's `nan_to_num(nan=0, posinf=1e5, neginf=-1e5)` of every gradient, run only when one
    is not finite: one reduction per device and a single host read decide it (nan_to_num is the
    identity on finite values, so the numbers are those of applying it always). True if any
    gradient was repaired."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return False
    # Any non-finite entry makes its tensor's 2-norm (or sum) non-finite; a finite one that
    # overflows only costs an unneeded (identity) repair. CUDA: one fused multi-tensor norm;
    # CPU: plain sums, faster there than torch's foreach norm (see docs/performance.md).
    fused = grads[0].device.type == "cuda"
    total = torch.stack(torch._foreach_norm(grads, 2) if fused else [g.sum() for g in grads])
    if bool(total.isfinite().all()):
        return False
    for g in grads:  # the rare non-finite step only
        torch.nan_to_num_(g, nan=0.0, posinf=1e5, neginf=-1e5)
    return True


def make_optimizer(params, cfg: DiffusionConfig) -> torch.optim.Adam:
    """The authors' Adam (betas 0.9/0.999, eps 1e-8), fused: one kernel over all tensors on
    CUDA, and on CPU one pass with no whole-model temporaries (15 % faster per paper-net step
    than torch's per-tensor loop, docs/performance.md; the same arithmetic, rounded differently
    in the last bits: tests/test_dydiff_equivalence.py)."""
    return torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=True)


def train_step(denoiser: EDMDenoiser, ema: EDMDenoiser, opt: torch.optim.Optimizer,
               segments: Segments, step: int, cfg: DiffusionConfig) -> torch.Tensor:
    """One optimiser step (0-based `step`) on a random batch of segments; returns the loss as
    a detached 0-d tensor on the model's device (no host sync). `segments` must be on the
    model's device (`Segments.to`): the batch is drawn and gathered there."""
    index = torch.randint(len(segments), (cfg.batch_size,), device=segments.device)
    x0, mask = segments.batch(index)
    for group in opt.param_groups:
        group["lr"] = lr_at(step, cfg)
    # The job's levers (harness/levers.py): the TF32 switches over forward and backward, bf16
    # autocast over the forward alone, the compiled U-Net if asked.
    chosen = levers()
    net = compiled(denoiser) if chosen.compile_train else denoiser
    with tf32_flags(chosen.diffusion_train):
        with autocast(chosen.diffusion_train, x0.device):
            loss = edm_loss(net, x0, mask, segments.obs_dim, cfg.P_mean, cfg.P_std,
                            cfg.action_cond_prob, cfg.loss_form)
        opt.zero_grad(set_to_none=True)
        loss.backward()
    repair_nonfinite_grads(denoiser.parameters())  # EDM zeroes non-finite gradients
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(denoiser.parameters(), cfg.grad_clip)
    opt.step()
    ema_update(ema, denoiser, ema_beta(step, cfg))
    return loss.detach()


def train_diffusion(dataset: Dataset, cfg: DiffusionConfig | dict, out_dir: str | Path,
                    seed: int = 0, log_fn: Callable[[dict, int], None] | None = None,
                    progress: bool = True, device: torch.device | str | None = None,
                    stop_at: int | None = None) -> dict:
    """Train (or resume) the diffusion model; returns a summary dict (also in model.pt).

    stop_at: return right after checkpointing gradient step `stop_at` (simulates pre-emption
    in tests); model.pt is not written then.
    """
    if not isinstance(cfg, DiffusionConfig):
        cfg = from_dict(DiffusionConfig, cfg, where="models.diffusion")
    out_dir, device, _ = start_training(out_dir, seed, device)
    segments = make_segments(dataset, cfg.horizon, kind=cfg.normalizer,
                             padding=cfg.padding).to(device)
    o, a = segments.obs_dim, segments.act_dim
    denoiser = build_denoiser(cfg, o + a).to(device)
    ema = build_denoiser(cfg, o + a).to(device).requires_grad_(False)
    ema.load_state_dict(denoiser.state_dict())
    opt = make_optimizer(denoiser.parameters(), cfg)
    # Losses since the last logged row: a float64 running sum on the device (sequential adds
    # of the float32 step losses, the same value as Python's sum of their .item()s) and a count,
    # read on the host only when a row is logged or a checkpoint written.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    loss_count = 0
    # A longer run continues a shorter one exactly, and the sampler only matters after
    # training: neither train_steps nor sampler has to match to resume.
    expect = {"config": {k: v for k, v in dataclasses.asdict(cfg).items()
                         if k not in ("train_steps", "sampler")}, "seed": seed}
    ckpt = Checkpointer(out_dir / CHECKPOINT, expect, every=cfg.checkpoint_every,
                        what="diffusion", columns=["step", "loss", "lr"])
    if ckpt.resumed:
        denoiser.load_state_dict(ckpt.state["model"])
        ema.load_state_dict(ckpt.state["ema"])
        opt.load_state_dict(ckpt.state["optimizer"])
        # (A checkpoint from before the running sum has another config, loss_form and
        # padding included, so `expect` refuses it before this point.)
        loss_sum.fill_(ckpt.state["pending_losses"]["sum"])
        loss_count = ckpt.state["pending_losses"]["count"]
    step = ckpt.start

    def state() -> dict:
        return {"model": denoiser.state_dict(), "ema": ema.state_dict(),
                "optimizer": opt.state_dict(),
                "pending_losses": {"sum": float(loss_sum), "count": loss_count}}

    n = len(segments)
    bar = tqdm(total=cfg.train_steps, initial=step, disable=not progress, desc="diffusion")
    denoiser.train()
    while step < cfg.train_steps:
        lr = lr_at(step, cfg)
        loss_sum += train_step(denoiser, ema, opt, segments, step, cfg)
        loss_count += 1
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.train_steps:
            row = ckpt.log({"step": step, "loss": float(loss_sum) / loss_count, "lr": lr})
            loss_sum.zero_()
            loss_count = 0
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            if log_fn is not None:
                log_fn({"diffusion_loss": row["loss"], "diffusion_lr": lr}, step)
        if ckpt.maybe_save(step, step == cfg.train_steps, state, stop_at):
            bar.close()
            return {"steps": step, "interrupted": True}
    bar.close()
    rows = ckpt.rows
    summary = {"steps": step, "final_loss": rows[-1]["loss"] if rows else float("nan"),
               "segments": n, "parameters": sum(p.numel() for p in denoiser.parameters()),
               "wall_time_s": rows[-1]["wall_time_s"] if rows else 0.0,
               "levers": {k: getattr(levers(), k) for k in USED_BY["diffusion"]}}
    save_checkpoint(out_dir / MODEL, {
        "ema": ema.state_dict(), "config": dataclasses.asdict(cfg),
        "normalizer": segments.normalizer.state_dict(), "obs_dim": o, "act_dim": a,
        "name": dataset.name, "summary": summary})
    return summary


def load_diffusion(out_dir: str | Path, device: torch.device | str = "cpu",
                   sampler: dict | str | None = None) -> DiffusionDynamics:
    """The EMA model from out_dir/model.pt; `sampler` overrides sampler settings (e.g. steps),
    or a preset name replaces them (the stored batch_size, a memory bound, is kept)."""
    path = Path(out_dir) / MODEL
    state = load_checkpoint(path)
    if state is None:
        raise FileNotFoundError(f"no diffusion model at {path}"
                                " (run `dydiff-bench train-model --model diffusion` first)")
    cfg_dict = dict(state["config"])
    if isinstance(sampler, str):
        preset = dataclasses.asdict(sampler_config(sampler, where="sampler"))
        sampler = {**preset, "batch_size": cfg_dict["sampler"]["batch_size"]}
    cfg_dict["sampler"] = {**cfg_dict["sampler"], **(sampler or {})}
    cfg = from_dict(DiffusionConfig, cfg_dict, where=f"{path}:config")
    denoiser = build_denoiser(cfg, state["obs_dim"] + state["act_dim"])
    denoiser.load_state_dict(state["ema"])
    return DiffusionDynamics(denoiser, Normalizer.from_state_dict(state["normalizer"]),
                             state["obs_dim"], state["act_dim"], cfg.horizon, cfg.sampler,
                             device, state["name"], cfg.action_cond_prob)
