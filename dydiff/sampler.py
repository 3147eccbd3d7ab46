"""EDM samplers with inpainting, and DyDiff's policy-injection loop.

`edm_sample` runs on the noise levels
sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, sigma_N = 0,
one of three solvers (`SamplerConfig.solver`):
  heun     Algorithm 2 of Karras et al. (2022): stochastic Heun, 2N - 1 network evaluations
           (the authors' sampler, the default; S_churn 0 makes it the deterministic Heun);
  dpmpp2m  DPM-Solver++(2M) (Lu et al. 2022), multistep second order in log-sigma, written for
           EDM's parameterisation (x = x0 + sigma eps, the denoiser output is the x0
           prediction): N network evaluations, the last step returns the denoised x;
  dpmpp2m_sde  its stochastic form (the SDE solver of the same paper, eta = 1, as
           k-diffusion's `sample_dpmpp_2m_sde`): fresh noise at every step, N evaluations.
Conditioning is by inpainting: the first state and (optionally) the first L actions are written
into x after every update, so they are exactly the given values in the output; as in the
authors' `condition_guidance_sampler` (generate_rl.py:67-75) the churned x_hat is denoised as
it is (`condition_churn: true`, the former default here, also writes the conditioning into it).
The updates run in float64, the network in float32, as the authors' (generate_rl.py:51,57,70,80;
their EDMPrecond casts its input to float32, training/networks.py:906); `dtype: float32` runs
the updates in float32 too.
Warm start (`warm_start`, SDEdit, Meng et al. 2022): an injection iteration starts from the
previous iteration's trajectory noised to `warm_sigma` and runs only the schedule's levels
below it, instead of a full sample from pure noise (see `DiffusionDynamics.inject`).
Presets (`SAMPLER_PRESETS`, `sampler_config`): "authors" (the defaults) and "fast" (the choice
of scripts/sampler_study.py, docs/sampler-study.md).

`DiffusionDynamics` is the loaded model: `sample`, `inject` (policy injection), and the
dynamics-model interface `open_loop` / `policy_rollout` used by the rollout-error study.
Policy injection (Zhao et al. 2024, Alg. 1; authors' `dynamics_recursive_sampler`,
generate_rl.py:91-122):
  s^0 = initial states, a^0 = pi(s^0)
  for k in 1..K:  s~ = DM(s_0, a^{k-1});  s^k = (s~ + s^{k-1}) / 2;  a^k = pi(s^k)
`init` chooses s^0:
  'ensemble' (the authors', generate_rl.py:99-110): the single-step probabilistic ensemble rolled
      out closed loop by the learning policy from s_0 (H - 1 transitions, a_i = pi(s_i)
      deterministic, plus a_{H-1} = pi(s_{H-1})); needs `ensemble` (baselines' EnsembleDynamics,
      reached through harness.registry.load_model, so this module never imports baselines/).
  'diffusion': an action-unconditioned diffusion sample (the model is trained with action
      dropout for this, see edm.py); no extra model.
  'policy': a diffusion sample conditioned on pi(s_0) repeated over the window.

Clipping (`limits`, the authors' LimitsNormalizer, training/dataset.py:455-472): the authors keep
trajectories in the normaliser's [-1, 1] "model space" unclipped and clip every model -> env
conversion. Here trajectories are in raw units, so every such conversion is a per-dimension
clamp to the dataset's [min, max]: states fed to the policy (rlkit/fake_env.py:109-117), states
and actions fed to the ensemble (run_scripts/dydiff_cql_script.py:194-200) and the returned
trajectory (rlkit/fake_env.py:42-50). The states held inside the loop (averaging included) and
the conditioning actions stay unclipped, as in the authors' model space (generate_rl.py:118).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from harness.config import ConfigError, from_dict, require
from harness.levers import autocast, compiled, levers, tf32_flags
from dydiff.segments import Normalizer
from dydiff.edm import EDMDenoiser, apply_conditioning


@dataclass
class SamplerConfig:
    # Paper / authors' exp_specs sampler_kwargs (EDM's ImageNet stochastic settings).
    solver: Literal["heun", "dpmpp2m", "dpmpp2m_sde"] = "heun"
    num_steps: int = 34
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    S_churn: float = 60.0
    S_min: float = 0.3699492132558657
    S_max: float = 52.241950650433864
    S_noise: float = 1.002
    # The authors denoise the churned x_hat unconditioned (generate_rl.py:68-70); true also
    # writes the conditioning into it (this harness's former sampler).
    condition_churn: bool = False
    # Arithmetic of the updates (levels, x, d): float64 as the authors' (generate_rl.py:51,57,70,
    # 80), the network in float32 either way; float32: the former sampler here.
    dtype: Literal["float64", "float32"] = "float64"
    # Warm start of the injection iterations (not the authors': each of theirs is a full
    # sample). warm_first: also the first one, from s^0 (the ensemble / init trajectory);
    # otherwise only iterations 2..K, which start from a diffusion-made trajectory.
    warm_start: bool = False
    warm_sigma: float = 1.0
    warm_first: bool = False
    batch_size: int = 4096  # trajectories per network call (memory bound, not a method setting)

    def validate(self) -> None:
        require(self.num_steps >= 1, "num_steps", f"must be >= 1, got {self.num_steps}")
        require(0 < self.sigma_min < self.sigma_max, "sigma_min",
                f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        require(self.rho > 0, "rho", f"must be > 0, got {self.rho}")
        require(self.S_churn >= 0, "S_churn", f"must be >= 0, got {self.S_churn}")
        require(self.solver == "heun" or self.S_churn == 0, "S_churn",
                f"solver {self.solver!r} has no churn step: set S_churn to 0 (got "
                f"{self.S_churn})")
        require(self.sigma_min < self.warm_sigma <= self.sigma_max, "warm_sigma",
                f"must be in (sigma_min, sigma_max], got {self.warm_sigma}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")

    def network_evaluations(self, warm: bool = False) -> int:
        """Denoiser calls per sample (a full one, or a warm-started one)."""
        n = len(_levels(self, warm)) - 1
        return 2 * n - 1 if self.solver == "heun" else n


# Named samplers for `models.diffusion.sampler` / `policy.rollout.sampler`: fields that differ
# from SamplerConfig's defaults (the authors'). "fast": scripts/sampler_study.py's choice
# (docs/sampler-study.md): DPM-Solver++(2M), 10 steps, the second injection warm-started at
# sigma 1; 15 instead of 134 network evaluations per trajectory (K = 2, ensemble start),
# 7.7-9.9x the authors' transitions/s, error and action gap not worse on the CPU model.
SAMPLER_PRESETS: dict[str, dict] = {
    "authors": {},
    "fast": {"solver": "dpmpp2m", "num_steps": 10, "S_churn": 0.0, "warm_start": True,
             "warm_sigma": 1.0, "dtype": "float32"},  # as measured
}


def sampler_config(value: "SamplerConfig | str | dict | None", where: str = "sampler"
                   ) -> SamplerConfig:
    """A SamplerConfig from a preset name, a mapping of its fields, or itself."""
    if isinstance(value, SamplerConfig):
        return value
    if isinstance(value, str):
        if value not in SAMPLER_PRESETS:
            raise ConfigError(f"{where}: unknown sampler preset {value!r}; known: "
                              f"{sorted(SAMPLER_PRESETS)}")
        value = SAMPLER_PRESETS[value]
    return from_dict(SamplerConfig, value, where=where)


def sigma_steps(cfg: SamplerConfig, device=None, dtype=torch.float32) -> torch.Tensor:
    """Karras noise levels sigma_0 = sigma_max > ... > sigma_{N-1} = sigma_min, sigma_N = 0,
    computed in float64 (generate_rl.py:51-54) and returned in `dtype`."""
    i = torch.arange(cfg.num_steps, dtype=torch.float64, device="cpu")
    inv = 1.0 / cfg.rho
    denom = max(cfg.num_steps - 1, 1)
    t = (cfg.sigma_max ** inv + i / denom * (cfg.sigma_min ** inv - cfg.sigma_max ** inv)) ** cfg.rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64, device="cpu")]).to(device=device,
                                                                   dtype=dtype)


def _dtype(cfg: SamplerConfig) -> torch.dtype:
    return torch.float64 if cfg.dtype == "float64" else torch.float32


def _levels(cfg: SamplerConfig, warm: bool) -> torch.Tensor:
    """The levels a sample runs through, on the host (CPU), in the sampler's dtype: the full
    schedule, or for a warm start warm_sigma followed by the schedule's levels below it (0
    included)."""
    t = sigma_steps(cfg, dtype=_dtype(cfg))
    if not warm:
        return t
    return torch.cat([torch.full((1,), cfg.warm_sigma, dtype=t.dtype, device="cpu"),
                      t[t < cfg.warm_sigma]])


@dataclass
class _Schedule:
    """A sample's noise levels, precomputed once per call so that the solver loop neither
    reads a level back from the device nor branches on one: `sig` (host floats) decide the
    branches, `steps` (rows on the sampling device, in the sampler's dtype) are indexed per
    step, which launches nothing. Heun rows: t_cur, t_next, t_hat, churn
    noise scale sqrt(t_hat^2 - t_cur^2) S_noise, t_next - t_hat; in the sampler's dtype, t_hat
    as the authors' t_cur + gamma t_cur in float64 (generate_rl.py:67), as the former
    t_cur (1 + gamma) in float32."""
    sig: list[float]
    levels: torch.Tensor   # (N + 1,) on the device
    steps: torch.Tensor    # (5, N) Heun rows on the device (empty for other solvers)


def _schedule(cfg: SamplerConfig, warm: bool, device) -> _Schedule:
    levels = _levels(cfg, warm)
    sig = levels.tolist()
    steps = torch.empty(5, 0, device="cpu")
    if cfg.solver == "heun":
        gamma_max = min(cfg.S_churn / cfg.num_steps, math.sqrt(2) - 1)
        t_cur, t_next = levels[:-1], levels[1:]
        gamma = [gamma_max if cfg.S_min <= v <= cfg.S_max else 0.0 for v in sig[:-1]]
        vec = lambda v: torch.tensor(v, dtype=levels.dtype, device="cpu")  # noqa: E731
        t_hat = (t_cur * vec([1 + g for g in gamma]) if cfg.dtype == "float32"
                 else t_cur + vec(gamma) * t_cur)
        noise = (t_hat ** 2 - t_cur ** 2).sqrt() * cfg.S_noise
        steps = torch.stack([t_cur, t_next, t_hat, noise, t_next - t_hat])
    return _Schedule(sig, levels.to(device), steps.to(device))


@torch.no_grad()
def edm_sample(denoiser: EDMDenoiser, shape: tuple[int, int, int], obs_dim: int,
               start_state: torch.Tensor, actions: torch.Tensor | None = None,
               cfg: SamplerConfig | None = None, generator: torch.Generator | None = None,
               warm: torch.Tensor | None = None) -> torch.Tensor:
    """Sample normalised trajectories (B, H, D) given normalised start states (B, o) and
    optionally normalised actions (B, L, a) for the first L rows. warm: a normalised
    trajectory (B, H, D) to start from, noised to cfg.warm_sigma (SDEdit); None: pure noise.
    Everything is created on start_state's device; the loop makes no host sync. The updates
    run in cfg.dtype, the network in float32 (`network_call`: the job's sampling levers);
    the result is float32."""
    cfg = cfg or SamplerConfig()
    device, dtype = start_state.device, _dtype(cfg)
    sched = _schedule(cfg, warm is not None, device)
    # The initial noise is drawn in float32 (the authors' latents, cast to float64 at
    # generate_rl.py:57), the churn noise in the updates' dtype (their randn_like(x_cur)).
    randn = lambda: torch.randn(shape, device=device, generator=generator,  # noqa: E731
                                dtype=dtype)
    latents = torch.randn(shape, device=device, generator=generator).to(dtype)
    cond = lambda x: apply_conditioning(x, obs_dim, start_state, actions)  # noqa: E731
    net = network_call(denoiser, dtype, device)
    t0 = sched.levels[0]
    x = latents * t0 if warm is None else warm.to(dtype) + latents * t0
    solve = _heun if cfg.solver == "heun" else _dpmpp2m
    return solve(net, cond(x), sched, cond, cfg, randn).float()


def network_call(denoiser: EDMDenoiser, dtype: torch.dtype, device):
    """The sampler's network call: the denoiser on float32 inputs, under the job's
    `levers().diffusion_sample` precision (TF32 switches; bf16 autocast around this call
    alone) and, with `compile_sample`, compiled; its output cast to the updates' `dtype`."""
    chosen = levers()
    precision = chosen.diffusion_sample
    fn = compiled(denoiser) if chosen.compile_sample else denoiser

    def call(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        with tf32_flags(precision), autocast(precision, device):
            out = fn(x.float(), sigma.float())
        return out.to(dtype)
    return call


def _heun(denoiser, x_next, sched: _Schedule, cond, cfg: SamplerConfig, randn) -> torch.Tensor:
    """EDM Algorithm 2 from x_next (at the first level) down the schedule's levels."""
    t_cur, t_next, t_hat, noise, dt = sched.steps.unbind(0)
    for i in range(len(sched.sig) - 1):  # the ODE/SDE steps are inherently sequential
        x_cur = x_next
        # The authors' sampler draws churn noise at every step (zero-scaled outside [S_min,
        # S_max]); keep that stream. Without churn there is nothing to draw.
        if cfg.S_churn > 0:
            x_hat = x_cur + noise[i] * randn()
            x_hat = cond(x_hat) if cfg.condition_churn else x_hat  # authors: as it is
        else:
            x_hat = x_cur
        d_cur = (x_hat - denoiser(x_hat, t_hat[i])) / t_hat[i]
        x_next = x_hat + dt[i] * d_cur
        if sched.sig[i + 1] > 0:  # Heun correction (not at sigma = 0)
            x_next = cond(x_next)
            d_prime = (x_next - denoiser(x_next, t_next[i])) / t_next[i]
            x_next = x_hat + dt[i] * (0.5 * d_cur + 0.5 * d_prime)
        x_next = cond(x_next)
    return x_next


def _dpmpp2m(denoiser, x, sched: _Schedule, cond, cfg: SamplerConfig, randn) -> torch.Tensor:
    """DPM-Solver++(2M) from x (at the first level). With lambda = -ln(sigma), h_i =
    lambda_{i+1} - lambda_i, q = sigma_{i+1} / sigma_i = e^{-h_i}, D_i the denoiser output and,
    after the first step, the multistep term M_i = (D_i - D_{i-1}) / (2 r), r = h_{i-1} / h_i:
      ODE (dpmpp2m):      x_{i+1} = q x_i + (1 - q) (D_i + M_i)
      SDE (dpmpp2m_sde):  x_{i+1} = q^2 x_i + (1 - q^2) (D_i + M_i) + sigma_{i+1} sqrt(1 - q^2) z
    The step to sigma = 0 returns D_i (first order, as the solvers' final step)."""
    sde = cfg.solver == "dpmpp2m_sde"
    sig = sched.sig
    prev, h_prev = None, None
    for i in range(len(sig) - 1):  # sequential by construction
        s, s_next = sig[i], sig[i + 1]
        denoised = denoiser(x, sched.levels[i])
        if s_next == 0:
            x = denoised
        else:
            h = math.log(s / s_next)
            d = denoised if prev is None else denoised + (denoised - prev) * (h / (2 * h_prev))
            q = s_next / s if not sde else (s_next / s) ** 2
            x = q * x + (1 - q) * d
            if sde:
                x = x + s_next * math.sqrt(1 - q) * randn()
            prev, h_prev = denoised, h
        x = cond(x)
    return x


@dataclass(frozen=True)
class Limits:
    """Per-dimension [lo, hi] of states and actions (the dataset's range): the clamp the
    authors' LimitsNormalizer applies on every model -> env conversion (training/dataset.py:
    455-472 clips the normalised array to [-1, 1], i.e. each dimension to [min_d, max_d]).

    Their clip is skipped when no entry exceeds [-1, 1] by more than 1e-4 (a whole-array
    tolerance); this clamp has no tolerance band, so values within 1e-4 * half-range outside
    the range are clipped here and not there."""
    obs_lo: torch.Tensor  # (o,)
    obs_hi: torch.Tensor
    act_lo: torch.Tensor  # (a,)
    act_hi: torch.Tensor

    def to(self, device: torch.device | str) -> "Limits":
        return Limits(*(x.to(device) for x in (self.obs_lo, self.obs_hi, self.act_lo,
                                                 self.act_hi)))

    def obs(self, x: torch.Tensor) -> torch.Tensor:
        """States (..., o) clamped per dimension."""
        return torch.clamp(x, self.obs_lo, self.obs_hi)

    def act(self, x: torch.Tensor) -> torch.Tensor:
        """Actions (..., a) clamped per dimension."""
        return torch.clamp(x, self.act_lo, self.act_hi)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _clippers(limits: Limits | None):
    """(clip_obs, clip_act): the limits' clamps, or identities without limits."""
    return (_identity, _identity) if limits is None else (limits.obs, limits.act)


def _policy(agent, states: torch.Tensor, limits: Limits | None = None) -> torch.Tensor:
    """Deterministic policy on (N, H, o) states, one batched call over N * H. With limits the
    policy sees the clipped states (authors' `_wrapped_policy`, rlkit/fake_env.py:109-117); its
    actions are returned unclipped (they condition the diffusion model in model space)."""
    n, h, o = states.shape
    clip_obs, _ = _clippers(limits)
    with torch.no_grad():
        return agent.act(clip_obs(states).reshape(n * h, o), deterministic=True).reshape(n, h, -1)


@torch.no_grad()
def ensemble_rollout(ensemble, start_obs: torch.Tensor, agent, horizon: int,
                     limits: Limits | None = None, start_step: str = "random_elite",
                     generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """s^0 of the authors' injection loop (generate_rl.py:99-110): the ensemble rolled out
    closed loop by the learning policy for horizon - 1 transitions, a_i = pi(s_i)
    (deterministic), s_{i+1} = f(s_i, a_i), and the last row's action a_{H-1} = pi(s_{H-1}).
    Returns states (N, H, o) (s_0 = start_obs) and actions (N, H, a).

    `ensemble` is an EnsembleDynamics. start_step random_elite (the authors'): each sample and
    step takes the mean of ONE elite drawn at random (`elite_step`, from `generator`;
    `deterministic=True`, rlkit/dynamics_model_trainer.py:212-215); elite_mean: the mean over
    the elites' means (`mean_step`), which makes s^0 deterministic and, without limits,
    exactly `ensemble.policy_rollout(start_obs, agent, horizon - 1)` (tested).
    With limits, the policy and the ensemble see clipped states and the ensemble clipped
    actions, as the authors' `dynamics_wrapper` (run_scripts/dydiff_cql_script.py:194-200)
    and `_wrapped_policy` do; the predicted states and the recorded actions are not clipped
    (the authors hold them in model space, where `env_to_model` does not clip)."""
    clip_obs, clip_act = _clippers(limits)
    device = start_obs.device
    act_of = lambda s: torch.as_tensor(agent.act(clip_obs(s), deterministic=True),  # noqa: E731
                                       dtype=torch.float32, device=device)
    state = start_obs
    states, actions = [state], []
    for _ in range(horizon - 1):  # a recurrence: each state needs the previous one
        action = act_of(state)
        if start_step == "random_elite":
            nxt = ensemble.elite_step(clip_obs(state), clip_act(action), generator)
        else:
            nxt, _ = ensemble.mean_step(clip_obs(state), clip_act(action))
        state = torch.as_tensor(nxt, dtype=torch.float32, device=device)
        states.append(state)
        actions.append(action)
    actions.append(act_of(state))
    return torch.stack(states, 1), torch.stack(actions, 1)


class DiffusionDynamics:
    """A trained dynamics diffusion model in raw (unnormalised) state/action units."""

    def __init__(self, denoiser: EDMDenoiser, normalizer: Normalizer, obs_dim: int,
                 act_dim: int, horizon: int, sampler: SamplerConfig | None = None,
                 device: torch.device | str = "cpu", name: str = "unknown",
                 action_cond_prob: float | None = None):
        self.denoiser = denoiser.to(device).eval().requires_grad_(False)
        self.normalizer = normalizer
        self.obs_norm = normalizer.slice(slice(0, obs_dim))
        self.act_norm = normalizer.slice(slice(obs_dim, obs_dim + act_dim))
        self.obs_dim, self.act_dim, self.horizon = obs_dim, act_dim, horizon
        self.sampler = sampler or SamplerConfig()
        self.device = torch.device(device)
        self.name = name
        # The training's (below 1 it can sample action-free); None: not known (built by hand).
        self.action_cond_prob = action_cond_prob

    # -- sampling -------------------------------------------------------------------------
    def sample(self, start_obs: torch.Tensor, actions: torch.Tensor | None = None,
               generator: torch.Generator | None = None, warm: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Trajectories from raw start states (N, o), optionally conditioned on the first L
        raw actions (N, L, a), L <= horizon -> raw (states (N, H, o), actions (N, H, a)).
        warm: raw states (N, H, o) to warm-start from (the sampler's warm_sigma; needs actions
        for all H rows, which fill the trajectory's action channels)."""
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
        if warm is not None:
            if a is None or a.shape[1] != self.horizon:
                raise ValueError("a warm start needs actions for all "
                                 f"{self.horizon} rows of the trajectory")
            warm = torch.as_tensor(warm, dtype=torch.float32, device=self.device)
            warm = torch.cat([self.obs_norm.normalize(warm), a], -1)
        d = self.obs_dim + self.act_dim
        out = []
        bs = self.sampler.batch_size
        for lo in range(0, n, bs):  # memory-bounded chunks; each chunk is one batched sample
            hi = min(lo + bs, n)
            x = edm_sample(self.denoiser, (hi - lo, self.horizon, d), self.obs_dim, s0[lo:hi],
                           None if a is None else a[lo:hi], self.sampler, generator,
                           None if warm is None else warm[lo:hi])
            out.append(x)
        x = self.normalizer.unnormalize(torch.cat(out))
        states, acts = x[..., :self.obs_dim], x[..., self.obs_dim:]
        # Inpainted entries are returned exactly as given (no round-off from (un)normalising).
        states[:, 0] = start_obs
        if actions is not None:
            acts[:, :actions.shape[1]] = actions
        return states, acts

    def inject(self, start_obs: torch.Tensor, agent, iterative_times: int = 2,
               average_states: bool = True,
               init: Literal["ensemble", "diffusion", "policy"] = "diffusion",
               generator: torch.Generator | None = None, limits: Limits | None = None,
               ensemble=None, start_step: str = "random_elite") -> dict:
        """Policy injection; returns states (N,H,o), actions = pi(states) (N,H,a), cond_actions
        (the actions the last states were generated with) and action_gap per iteration:
        mean ||cond_actions - pi(states)|| (index 0 = before injection; 0 for init='ensemble',
        whose s^0 is generated with the policy's own actions).

        init='ensemble' needs `ensemble` (see `ensemble_rollout`, which `start_step` and
        `generator` go to); with K = 0 it returns that
        rollout unchanged. With the sampler's warm_start, iteration k >= 2 (and with warm_first
        also k = 1) starts from s^{k-1} noised to warm_sigma instead of pure noise.
        `limits`: the policy (and the ensemble) see clipped states; the returned states and
        actions are not clipped (see the module docstring)."""
        start_obs = torch.as_tensor(start_obs, dtype=torch.float32, device=self.device)
        if init == "ensemble":
            if ensemble is None:
                raise ValueError("init='ensemble' needs the single-step ensemble "
                                 "(pass ensemble=...)")
            states, actions = ensemble_rollout(ensemble, start_obs, agent, self.horizon, limits,
                                               start_step, generator)
            states, actions = states.to(self.device), actions.to(self.device)
            cond_actions = actions  # authors: cond_actions = trajs[..., obs_dim:] (line 111)
        elif init in ("diffusion", "policy"):
            if init == "diffusion":
                states, cond_actions = self.sample(start_obs, None, generator)
            else:
                a0 = _policy(agent, start_obs[:, None], limits).expand(-1, self.horizon, -1)
                states, cond_actions = self.sample(start_obs, a0, generator)
            actions = _policy(agent, states, limits)
        else:
            raise ValueError(f"init must be 'ensemble', 'diffusion' or 'policy', got {init!r}")
        gap = lambda: (cond_actions - actions).norm(dim=-1).mean()  # noqa: E731
        gaps = [gap()]  # on the device; read back once, at the end
        cfg = self.sampler
        for k in range(iterative_times):  # generate_rl.py:112-121
            cond_actions = actions
            # Warm start: from s^k noised to warm_sigma (the authors sample from pure noise).
            warm = states if cfg.warm_start and (k > 0 or cfg.warm_first) else None
            new_states, _ = self.sample(start_obs, cond_actions, generator, warm)
            states = (new_states + states) / 2 if average_states else new_states
            actions = _policy(agent, states, limits)
            gaps.append(gap())
        return {"states": states, "actions": actions, "cond_actions": cond_actions,
                "action_gap": torch.stack(gaps).tolist()}

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
                       init: Literal["ensemble", "diffusion", "policy"] = "diffusion",
                       limits: Limits | None = None, ensemble=None,
                       generator: torch.Generator | None = None,
                       start_step: str = "random_elite") -> dict:
        """Policy-injected rollout of H transitions: dict(obs, actions, next_obs) each (N,H,.),
        cond_actions (N,H,a) (per transition, the actions its states were sampled with in the
        last injection iteration: `inject`'s cond_actions, unclipped), last_obs (N,o) /
        last_action (N,a) (the row after the last transition: s_H and pi(s_H), which the
        authors' filter score also counts), and action_gap (per injection iteration, first
        window). Longer than horizon - 1 transitions are chained windows,
        each starting from the previous window's last state.

        With `limits`, the returned states and actions are clipped to them (authors'
        `TrajFakeEnv.step`, rlkit/fake_env.py:42-50), except obs[:, 0], which stays the given
        start state (the authors store the real start obs, rlkit/trainer.py:284,289); a chained
        window starts from the clipped last state, so obs[:, t + 1] == next_obs[:, t]."""
        start = torch.as_tensor(start_obs, dtype=torch.float32, device=self.device)
        clip_obs, clip_act = _clippers(limits)
        obs, acts, nxt, cond, gaps = [], [], [], [], None
        step = self.horizon - 1
        for lo in range(0, H, step):
            k = min(step, H - lo)
            out = self.inject(start, agent, iterative_times, average_states, init, generator,
                              limits, ensemble, start_step)
            gaps = gaps or out["action_gap"]
            states = torch.cat([start[:, None], clip_obs(out["states"][:, 1:k + 1])], 1)
            actions = clip_act(out["actions"])
            obs.append(states[:, :k])
            acts.append(actions[:, :k])
            nxt.append(states[:, 1:k + 1])
            cond.append(out["cond_actions"][:, :k])
            start, last_action = states[:, k], actions[:, k]
        return {"obs": torch.cat(obs, 1), "actions": torch.cat(acts, 1),
                "next_obs": torch.cat(nxt, 1), "cond_actions": torch.cat(cond, 1),
                "last_obs": start, "last_action": last_action, "action_gap": gaps}
