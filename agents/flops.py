"""The matmuls of one agent update, from the layer shapes: FLOPs and a floor for the benchmarks;
and what the update timings share (tests/benchmarks/test_bench_agents.py,
scripts/agent_levers.py): the synthetic batch and the paired speed-up with its CI.

A linear layer on m rows is one (m, in) @ (in, out) product forward, 2*m*in*out FLOPs;
backward, one (in, m) @ (m, out) product for the weight gradient and one (m, out) @ (out, in)
for the input gradient, each only where autograd computes it (no weight gradient through
detached or no-grad weights, no input gradient into the first layer unless its input needs
one), so backward is about 2x forward. Element-wise work (activations, losses, Adam) is left
out: it is small next to the matmuls at these widths. The critics run large inputs in chunks
of `StackedMLP.chunk_rows` rows, listed as such (same FLOPs). `former=True` counts the update
before the stacked critics (tests/test_agent_equivalence.py keeps it): CQL's actor forward on
the N-fold repeated states, the critic weight gradients of the actor loss, no chunks.
"""
from __future__ import annotations

import numpy as np
import torch

from agents.cql import CQL
from agents.diffql import DiffQL
from agents.sac import SAC
from agents.td3bc import TD3BC
from harness.nets import StackedMLP

Matmul = tuple[int, int, int]  # (m, k, n): an (m, k) @ (k, n) product, 2*m*k*n FLOPs


def mlp_matmuls(rows: int, dims: list[int], weight_grad: bool = False,
                input_grad: bool = False) -> list[Matmul]:
    """One pass of an MLP with layer widths `dims` on `rows` rows, with the backward it needs."""
    layers = list(zip(dims[:-1], dims[1:]))
    out = [(rows, a, b) for a, b in layers]
    if weight_grad:
        out += [(a, rows, b) for a, b in layers]
    if weight_grad or input_grad:  # gradients flow back through every layer above the first
        out += [(rows, b, a) for i, (a, b) in enumerate(layers) if i > 0 or input_grad]
    return out


def diffql_matmuls(agent: DiffQL, b: int) -> list[Matmul]:
    """One Diffusion-QL update: the TD target's EMA-actor chain (T eps_theta passes on b * k
    rows, k = max_q_samples with max_q_backup) and target critics; both critics' step; L_bc's
    eps_theta pass; for q_term chain the T-step chain with gradients; the two critics on the
    new action, one differentiated back to it (weights detached), the other without gradients. The time MLP runs on T rows per chain and b
    rows in L_bc."""
    cfg, o, a = agent.cfg, agent.obs_dim, agent.act_dim
    eps = [a + cfg.t_dim + o, *cfg.actor_hidden, a]
    time = [cfg.t_dim, 2 * cfg.t_dim, cfg.t_dim]
    critic = [o + a, *cfg.critic_hidden, 1]
    T, k = cfg.n_timesteps, cfg.max_q_samples if cfg.max_q_backup else 1
    target = mlp_matmuls(T, time) + T * mlp_matmuls(b * k, eps) + 2 * mlp_matmuls(b * k, critic)
    critic_step = 2 * mlp_matmuls(b, critic, weight_grad=True)
    # eps_theta's input [x_t, emb(t), s] needs its gradient for the time MLP (and x_t's in the
    # chain), so every eps_theta pass with gradients includes its first layer's input gradient
    bc = mlp_matmuls(b, time, weight_grad=True) + mlp_matmuls(b, eps, weight_grad=True,
                                                                input_grad=True)
    chain = []
    if cfg.q_term == "chain":
        chain = (mlp_matmuls(T, time, weight_grad=True)
                 + T * mlp_matmuls(b, eps, weight_grad=True, input_grad=True))
    q_term = mlp_matmuls(b, critic) + mlp_matmuls(b, critic, input_grad=True)
    return target + critic_step + bc + chain + q_term


def update_matmuls(agent: TD3BC | SAC | CQL | DiffQL, batch_size: int, former: bool = False
                   ) -> tuple[list[Matmul], int]:
    """The matmuls of one cycle of updates on `batch_size` rows and the updates in it: TD3+BC's
    cycle is policy_freq updates (one with the actor step), the others' a single update."""
    if isinstance(agent, DiffQL):
        return diffql_matmuls(agent, batch_size), 1
    cfg, b, o, a = agent.cfg, batch_size, agent.obs_dim, agent.act_dim
    critic = [o + a, *cfg.hidden, 1]

    def twin(rows: int, **grads) -> list[Matmul]:  # both critics, in chunks as they run
        size = rows if former else StackedMLP.chunk_rows
        return [mm for start in range(0, rows, size)
                for mm in 2 * mlp_matmuls(min(size, rows - start), critic, **grads)]
    if isinstance(agent, TD3BC):
        actor = [o, *cfg.hidden, a if cfg.actor == "deterministic" else 2 * a]
        critic_step = (mlp_matmuls(b, actor) + twin(b)                   # TD target
                       + twin(b, weight_grad=True))
        actor_step = (mlp_matmuls(b, actor, weight_grad=True)            # pi(s) and Q1(s, pi)
                      + mlp_matmuls(b, critic, weight_grad=former, input_grad=True))
        return cfg.policy_freq * critic_step + actor_step, cfg.policy_freq
    actor = [o, *cfg.hidden, 2 * a]
    actor_loss = (mlp_matmuls(b, actor, weight_grad=True)
                  + twin(b, weight_grad=former, input_grad=True))
    if not isinstance(agent, CQL):
        return (mlp_matmuls(b, actor) + twin(b)                          # TD target
                + twin(b, weight_grad=True) + actor_loss), 1
    n = cfg.num_repeat_actions
    target_rows = b * n if cfg.max_target_backup else b
    if former:  # one actor forward per row: the TD target's, then 2BN repeated rows
        no_grad_actor = mlp_matmuls(target_rows, actor) + 2 * mlp_matmuls(b * n, actor)
        critic_step = twin(b, weight_grad=True) + twin(3 * b * n, weight_grad=True)
    else:  # one forward on [s; s'], one critic call on the data and the 3N proposals
        no_grad_actor = mlp_matmuls(2 * b, actor)
        critic_step = twin(b + 3 * b * n, weight_grad=True)
    return no_grad_actor + twin(target_rows) + critic_step + actor_loss, 1


def update_flops(agent: TD3BC | SAC | CQL | DiffQL, batch_size: int, former: bool = False) -> float:
    """Matmul FLOPs of one `agent.update` on `batch_size` rows (TD3+BC: averaged over its
    policy_freq cycle of critic-only and critic + actor updates)."""
    matmuls, updates = update_matmuls(agent, batch_size, former)
    return sum(2 * m * k * n for m, k, n in matmuls) / updates


def timing_batch(batch_size: int, obs_dim: int, act_dim: int) -> dict[str, torch.Tensor]:
    """The fixed synthetic batch the update timings use (benchmark and scripts/agent_levers.py):
    observations ~ N(2, 3^2) as unnormalised states, actions in [-1, 1], no terminals."""
    g = torch.Generator().manual_seed(0)
    return {"obs": torch.randn(batch_size, obs_dim, generator=g) * 3 + 2,
            "actions": torch.rand(batch_size, act_dim, generator=g) * 2 - 1,
            "rewards": torch.randn(batch_size, generator=g),
            "next_obs": torch.randn(batch_size, obs_dim, generator=g) * 3 + 2,
            "terminals": torch.zeros(batch_size)}


def paired_speedup(slow: np.ndarray, fast: np.ndarray, reps: int = 10_000
                   ) -> tuple[float, float, float]:
    """mean(slow) / mean(fast) over paired rounds (round i of both timed back to back), with
    its 95 % bootstrap CI from resampling rounds."""
    rounds = np.random.default_rng(0).integers(0, len(slow), (reps, len(slow)))
    lo, hi = np.quantile(slow[rounds].mean(1) / fast[rounds].mean(1), [0.025, 0.975])
    return float(slow.mean() / fast.mean()), float(lo), float(hi)
