"""Fewer launches and syncs (issue 24 item 7) with the same numbers, and device-agnostic code.

The former code paths (fd9d912) are kept here, callable, as the reference: `former_train_step`
(host-drawn batch copied to the device each step, one nan_to_num and one lerp_ per parameter
tensor, loss.item() per step, torch's default per-tensor Adam) and `former_edm_sample` (sigma
levels read back per Heun step). tests/benchmarks/test_bench_diffusion.py times them against
the current code. With the same optimizer on both sides the current step code gives
bit-identical numbers on CPU (torch.equal): the same RNG draws in the same order, the same
float32 operations on the same values, and a logged mean that adds the same float32 losses
in float64 in the same order as Python's sum (Python 3.11: plain sequential adds; a
compensated sum would differ in the last bits, so the logged rows are compared to 1e-12
relative, everything else exactly). The one change of arithmetic is Adam's fused form (the
same update rounded differently): compared with torch's per-tensor Adam to a tolerance.

Device placement: `meta` tensors have no data, so any tensor created on another device (a
CPU default) meets them in an op and raises. The sampler (edm_sample, DiffusionDynamics.sample,
the ensemble start) makes no data-dependent host read and runs on `meta` end to end. Training
(one host read per step: the finiteness check), injection (the action gaps, read back once)
and the generator (filter indices, boolean masks of the kept transitions) read data back, so
they run on CPU under `NoImplicitDevice`, a TorchFunctionMode that fails every factory call
(zeros, randn, arange, tensor, ...) made without an explicit device.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from harness.config import from_dict
from dydiff.diffusion import (DiffusionConfig, build_denoiser, ema_beta, lr_at, make_optimizer,
                              train_diffusion, train_step)
from dydiff.edm import apply_conditioning, edm_loss
from dydiff.rollout import DyDiffConfig, DyDiffGenerator, Limits
from dydiff.sampler import (DiffusionDynamics, SamplerConfig, edm_sample, ensemble_rollout,
                            sigma_steps)
from dydiff.segments import Segments, make_segments
from test_diffusion import TINY, toy_dataset

# The pre-change sampler semantics, which the equivalence is about (issue 26 item 1 made the
# authors' float64 / unconditioned-churn sampler the default; these two keys give the former).
FORMER_SAMPLER = {"dtype": "float32", "condition_churn": True}
FORMER_LOSS = {"loss_form": "masked_mean"}  # issue 26 item 2: the former loss


# --- the former code paths (fd9d912), the reference ----------------------------------------

def former_batch(seg: Segments, index: torch.Tensor):
    rows = seg.starts[index][:, None] + torch.arange(seg.horizon)
    x = seg.rows[rows]
    mask = torch.cat([seg.state_valid[rows, None].expand(-1, -1, seg.obs_dim),
                      seg.action_valid[rows, None].expand(-1, -1, seg.act_dim)], -1)
    return x, mask.float()


@torch.no_grad()
def former_ema_update(ema, net, beta):
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p, 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)


def former_train_step(denoiser, ema, opt, segments, step, cfg, device="cpu", **loss_kw):
    """The former train_step: CPU segments, batch copied to `device`, loss.item()."""
    index = torch.randint(len(segments), (cfg.batch_size,))
    x0, mask = former_batch(segments, index)
    for group in opt.param_groups:
        group["lr"] = lr_at(step, cfg)
    loss = edm_loss(denoiser, x0.to(device), mask.to(device), segments.obs_dim, cfg.P_mean,
                    cfg.P_std, cfg.action_cond_prob, **(loss_kw or FORMER_LOSS))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for p in denoiser.parameters():
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(denoiser.parameters(), cfg.grad_clip)
    opt.step()
    former_ema_update(ema, denoiser, ema_beta(step, cfg))
    return loss.item()


def former_optimizer(params, cfg):
    return torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)


def _former_levels(cfg, warm, device=None):
    t = sigma_steps(cfg, device)
    if not warm:
        return t
    below = t[t < cfg.warm_sigma]
    return torch.cat([torch.full((1,), cfg.warm_sigma, dtype=t.dtype, device=t.device), below])


@torch.no_grad()
def former_edm_sample(denoiser, shape, obs_dim, start_state, actions=None, cfg=None,
                      generator=None, warm=None):
    """The former edm_sample (float32, conditioning written into the churned x_hat, levels
    read back from the device per step)."""
    cfg = cfg or SamplerConfig()
    device = start_state.device
    t_steps = _former_levels(cfg, warm is not None, device)
    randn = lambda: torch.randn(shape, device=device, generator=generator)  # noqa: E731
    cond = lambda x: apply_conditioning(x, obs_dim, start_state, actions)  # noqa: E731
    x = randn() * t_steps[0] if warm is None else warm + randn() * t_steps[0]
    x_next = cond(x)
    if cfg.solver != "heun":
        sig = [float(v) for v in t_steps]
        prev, h_prev = None, None
        sde = cfg.solver == "dpmpp2m_sde"
        for i in range(len(sig) - 1):
            s, s_next = sig[i], sig[i + 1]
            denoised = denoiser(x_next, t_steps[i])
            if s_next == 0:
                x_next = denoised
            else:
                h = math.log(s / s_next)
                d = denoised if prev is None else denoised + (denoised - prev) * (h / (2 * h_prev))
                q = s_next / s if not sde else (s_next / s) ** 2
                x_next = q * x_next + (1 - q) * d
                if sde:
                    x_next = x_next + s_next * math.sqrt(1 - q) * randn()
                prev, h_prev = denoised, h
            x_next = cond(x_next)
        return x_next
    gamma_max = min(cfg.S_churn / cfg.num_steps, math.sqrt(2) - 1)
    for i in range(len(t_steps) - 1):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        x_cur = x_next
        gamma = gamma_max if cfg.S_min <= float(t_cur) <= cfg.S_max else 0.0
        t_hat = t_cur * (1 + gamma)
        x_hat = (cond(x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * cfg.S_noise * randn())
                 if cfg.S_churn > 0 else x_cur)
        d_cur = (x_hat - denoiser(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if t_next > 0:
            x_next = cond(x_next)
            d_prime = (x_next - denoiser(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        x_next = cond(x_next)
    return x_next


# --- equivalence on CPU ---------------------------------------------------------------------

def _tiny(**over):
    return from_dict(DiffusionConfig, {**TINY, "lr_rampup_kimg": 0.5, "ema_halflife_kimg": 0.5,
                                       **FORMER_LOSS, **over})


def _pair(cfg, seg):
    torch.manual_seed(0)
    den = build_denoiser(cfg, seg.obs_dim + seg.act_dim)
    ema = copy.deepcopy(den).requires_grad_(False)
    return den, ema


def test_train_step_same_loss_trajectory_and_weights_as_the_former():
    seg = make_segments(toy_dataset(), 8)
    cfg = _tiny()
    runs = []
    for new in (False, True):
        den, ema = _pair(cfg, seg)
        opt = make_optimizer(den.parameters(), cfg)  # the step code is compared, not Adam's form
        torch.manual_seed(7)
        losses = [float(train_step(den, ema, opt, seg.to("cpu"), k, cfg)) if new
                  else former_train_step(den, ema, opt, seg, k, cfg) for k in range(12)]
        runs.append((losses, den.state_dict(), ema.state_dict()))
    (l0, d0, e0), (l1, d1, e1) = runs
    assert l0 == l1 and len(set(l0)) > 1
    for k in d0:
        assert torch.equal(d0[k], d1[k]) and torch.equal(e0[k], e1[k]), k


def test_fused_adam_matches_the_former_per_tensor_adam():
    """make_optimizer's fused Adam and the former per-tensor Adam, 12 steps of the former step
    code from the same weights and batches: the same trajectory up to float32 rounding (a
    wrong beta, eps or bias correction would move the weights by ~lr, 1e-4, not the 1e-7 seen)."""
    seg = make_segments(toy_dataset(), 8)
    cfg = _tiny()
    runs = []
    for fused in (False, True):
        den, ema = _pair(cfg, seg)
        opt = (make_optimizer if fused else former_optimizer)(den.parameters(), cfg)
        assert opt.defaults["fused"] is (True if fused else None)
        torch.manual_seed(7)
        losses = [former_train_step(den, ema, opt, seg, k, cfg) for k in range(12)]
        runs.append((losses, den.state_dict()))
    (l0, d0), (l1, d1) = runs
    np.testing.assert_allclose(l1, l0, rtol=1e-4)
    moved = max(float((d1[k] - d0[k]).abs().max()) for k in d0)
    assert 0 < moved < 1e-6


def test_nonfinite_gradients_are_repaired_as_edm_does():
    """The one finiteness check leads to nan_to_num(nan=0, posinf=1e5, neginf=-1e5) exactly
    when a gradient is not finite (then the step equals the former's), and to nothing else."""
    seg = make_segments(toy_dataset(), 8)
    cfg = _tiny()
    results = []
    for new in (False, True):
        den, ema = _pair(cfg, seg)
        opt = make_optimizer(den.parameters(), cfg)  # the step code is compared, not Adam's form
        poison = [float("nan"), float("inf"), -float("inf")]
        hook = den.net.parameters().__next__().register_hook(
            lambda g: g.flatten().index_put((torch.arange(3),), torch.tensor(poison)).view_as(g))
        torch.manual_seed(3)
        (train_step(den, ema, opt, seg, 0, cfg) if new else former_train_step(den, ema, opt, seg, 0, cfg))
        hook.remove()
        results.append((next(den.net.parameters()).grad.flatten()[:3].tolist(), den.state_dict()))
    assert results[1][0] == [0.0, 1e5, -1e5] == results[0][0]
    assert all(torch.equal(results[0][1][k], results[1][1][k]) for k in results[0][1])


def test_logged_losses_are_the_former_means(tmp_path):
    """train_diffusion's rows (mean of the step losses since the last row) equal the former
    per-step .item() means; the resume tests in test_diffusion.py cover the running sum across
    a checkpoint."""
    ds = toy_dataset()
    cfg = {**TINY, **FORMER_LOSS, "train_steps": 9, "log_every": 4, "checkpoint_every": 9}
    train_diffusion(ds, cfg, tmp_path, seed=5, progress=False, device="cpu")
    got = pd.read_parquet(tmp_path / "metrics.parquet")
    # The former loop, by hand: same seed, same segments, same model construction order.
    from harness.runtime import seed_everything
    seed_everything(5)
    c = from_dict(DiffusionConfig, cfg)
    seg = make_segments(ds, c.horizon)
    den = build_denoiser(c, seg.obs_dim + seg.act_dim)
    ema = build_denoiser(c, seg.obs_dim + seg.act_dim).requires_grad_(False)
    ema.load_state_dict(den.state_dict())
    opt = make_optimizer(den.parameters(), c)
    losses = [former_train_step(den, ema, opt, seg, k, c) for k in range(9)]
    want = [sum(losses[0:4]) / 4, sum(losses[4:8]) / 4, losses[8]]
    assert got["step"].tolist() == [4, 8, 9]
    np.testing.assert_allclose(got["loss"], want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("sampler", [
    {"num_steps": 6},                                                     # churned Heun
    {"num_steps": 5, "S_churn": 0.0},                                     # deterministic Heun
    {"num_steps": 6, "warm_start": True, "warm_sigma": 1.0},              # warm start
    {"solver": "dpmpp2m", "num_steps": 6, "S_churn": 0.0},
    {"solver": "dpmpp2m_sde", "num_steps": 6, "S_churn": 0.0, "warm_start": True},
])
def test_edm_sample_same_samples_as_the_former(sampler):
    cfg = from_dict(SamplerConfig, {**FORMER_SAMPLER, **sampler})
    torch.manual_seed(0)
    den = build_denoiser(_tiny(), 5).eval()
    start, acts = torch.randn(4, 3), torch.randn(4, 8, 2)
    warm = torch.randn(4, 8, 5) if cfg.warm_start else None
    out = []
    for fn in (former_edm_sample, edm_sample):
        g = torch.Generator().manual_seed(11)
        out.append(fn(den, (4, 8, 5), 3, start, acts, cfg, g, warm))
    assert torch.equal(out[0], out[1]) and torch.isfinite(out[1]).all()


def test_normalizer_tensors_are_built_once_per_device_and_dtype():
    seg = make_segments(toy_dataset(), 8)
    norm = seg.normalizer
    x = torch.randn(4, 5)
    y = norm.normalize(x)
    assert torch.equal(norm.unnormalize(y), x * 0 + norm.unnormalize(y))
    first = norm._tensors[(x.device, x.dtype)]
    norm.normalize(torch.randn(2, 5))
    assert norm._tensors[(x.device, x.dtype)][0] is first[0] and len(norm._tensors) == 1
    norm.normalize(torch.randn(2, 5, dtype=torch.float64))
    assert len(norm._tensors) == 2
    np.testing.assert_array_equal(y.numpy(), ((x.numpy() - norm.shift) / norm.scale))


# --- device placement -----------------------------------------------------------------------

META = torch.device("meta")


class StubAgent(nn.Module):
    """A deterministic linear policy, tanh-squashed, on whatever device it is moved to."""

    def __init__(self, o=3, a=2):
        super().__init__()
        self.lin = nn.Linear(o, a)

    @torch.no_grad()
    def act(self, obs, deterministic=True):
        return torch.tanh(self.lin(obs))


class StubEnsemble(nn.Module):
    obs_dim, act_dim = 3, 2

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)

    @torch.no_grad()
    def mean_step(self, obs, act):
        return obs + 0.1 * self.lin(torch.cat([obs, act], -1)), None

    def elite_step(self, obs, act, generator=None):
        return self.mean_step(obs, act)[0]


def _dynamics(device, **sampler):
    cfg = _tiny(sampler={"num_steps": 4, **sampler})
    torch.manual_seed(0)
    seg = make_segments(toy_dataset(), cfg.horizon)
    return DiffusionDynamics(build_denoiser(cfg, 5), seg.normalizer, 3, 2, cfg.horizon,
                             cfg.sampler, device)


@pytest.mark.parametrize("sampler", [{}, FORMER_SAMPLER, {"S_churn": 0.0},
                                     {"solver": "dpmpp2m", "S_churn": 0.0, "warm_start": True}])
def test_sampler_runs_on_the_meta_device(sampler):
    """Every tensor the sampler creates is on its inputs' device: with the model and inputs on
    `meta`, a CPU-made tensor would raise."""
    dyn = _dynamics(META, **sampler)
    start, acts = torch.randn(4, 3, device=META), torch.randn(4, 8, 2, device=META)
    states, actions = dyn.sample(start, acts, warm=torch.randn(4, 8, 3, device=META)
                                 if dyn.sampler.warm_start else None)
    assert states.device == META and states.shape == (4, 8, 3) and actions.shape == (4, 8, 2)
    lim = Limits(*(torch.zeros(k, device=META) for k in (3, 3, 2, 2)))
    s, a = ensemble_rollout(StubEnsemble().to(META), start, StubAgent().to(META), 8, lim)
    assert s.device == a.device == META and s.shape == (4, 8, 3)


def test_meta_catches_a_tensor_made_on_the_cpu():
    """The check can fail: the sampler's noise made on the CPU (here from a CPU start state)
    meets the meta model and raises. (meta does not catch everything: 0-d CPU tensors act as
    scalars and copies into meta tensors are allowed; the U-Net and sampler make neither.)"""
    dyn = _dynamics(META)
    with pytest.raises(RuntimeError, match="device"):
        edm_sample(dyn.denoiser, (4, 8, 5), 3, torch.randn(4, 3), None, dyn.sampler)


FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.rand,
             torch.randn, torch.randint, torch.randperm, torch.tensor, torch.eye,
             torch.linspace}


class NoImplicitDevice(TorchFunctionMode):
    """Fails every factory call (and as_tensor of non-tensor data) without an explicit device:
    on a GPU such a tensor would land on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        implicit = (func in FACTORIES or
                    (func is torch.as_tensor and not torch.is_tensor(args[0]))) \
            and kwargs.get("device") is None
        if implicit:
            raise AssertionError(f"torch.{func.__name__} without device=")
        return func(*args, **kwargs)


def test_no_implicit_device_mode_can_fail():
    with NoImplicitDevice(), pytest.raises(AssertionError, match="zeros without device"):
        torch.zeros(3)


def test_training_and_generator_create_no_tensor_without_a_device():
    """Training steps and the full generator (injection, rewards, filter, truncation) under
    NoImplicitDevice on CPU (they read data back, so `meta` cannot run them)."""
    seg = make_segments(toy_dataset(), 8)
    cfg = _tiny()
    den, ema = _pair(cfg, seg)
    opt = make_optimizer(den.parameters(), cfg)
    dyn = _dynamics("cpu")
    lim = Limits(-torch.ones(3) * 5, torch.ones(3) * 5, -torch.ones(2), torch.ones(2))
    reward = lambda o, a: o.sum(-1) - a.pow(2).sum(-1)  # noqa: E731
    done = lambda nxt: nxt[..., 0] > 1.5  # noqa: E731
    gen = DyDiffGenerator(dyn, reward, done, DyDiffConfig(rollout_batch_size=6), StubEnsemble(),
                          lim)
    start, agent = torch.randn(6, 3), StubAgent()
    with NoImplicitDevice():
        for k in range(2):
            train_step(den, ema, opt, seg, k, cfg)
        out = gen.generate(agent, start)
    assert out["obs"].shape[1] == 3 and np.isfinite(out["return_mean"])
