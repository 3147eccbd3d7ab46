"""Agent-update levers beyond the ones taken (issue 16): do they make TD3+BC and SAC faster?

The current update (stacked twin critics, fused Adam, detached critic weights in the actor
loss: agents/*.py) is timed against the same update with one lever applied, rounds of each
alternating in one process so that drifts of a shared machine hit both alike:

  * "one-node critic": the stacked critic MLP as a single autograd node whose backward is
    written out (per member and layer: weight-gradient mm, bias sum, input-gradient mm,
    ReLU mask), instead of autograd's graph of addmm / relu / unbind nodes. It tests whether
    autograd's bookkeeping is what keeps the update above its matmul time.
  * "compiled nets": `torch.compile` (inductor, default mode) of the actor, critic and target
    networks, so that each network's forward and backward become fused kernels; the
    optimiser steps stay eager; random draws as eager's (`fallback_random`). Compile time
    is reported apart and left out of the timing.

Every variant's first update must log the same losses as the current one (rtol 1e-4) or the
script stops.

Each agent runs at batch 256 on one thread with the benchmark's sizes
(tests/benchmarks/test_bench_agents.py: 2 x 256, halfcheetah-sized 17 / 6). Per variant: the
mean ms per update over `--rounds` rounds of `--updates` updates, and its speed ratio to the
current update with a 95 % bootstrap CI over rounds (paired: round i of both). TD3+BC is
averaged over whole actor-delay cycles (an even number of updates).

Usage:  OMP_NUM_THREADS=1 .venv/bin/python scripts/agent_levers.py [--rounds 8] [--updates 40]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agents.flops import paired_speedup, timing_batch  # noqa: E402
from agents.sac import SAC, SACConfig  # noqa: E402
from agents.td3bc import TD3BC  # noqa: E402
from harness.config import from_dict  # noqa: E402
from harness.nets import StackedMLP  # noqa: E402

OBS, ACT, BATCH = 17, 6, 256


class CriticOneNode(torch.autograd.Function):
    """Members `index` of a stacked ReLU MLP on x ((R, in) shared, or one (R, in) per member of
    `index`) as one autograd node."""

    @staticmethod
    def forward(ctx, x, index, *params):
        weights, biases = params[0::2], params[1::2]
        last = len(weights) - 1
        out = x.new_empty(len(index), x.shape[-2], weights[-1].shape[-1])
        inputs = []  # per member, the input of every layer (ReLU outputs after the first)
        for j, e in enumerate(index):
            h, seen = (x if x.dim() == 2 else x[j]), []  # one input per member run
            for k, (w, b) in enumerate(zip(weights, biases)):
                seen.append(h)
                if k < last:
                    h = torch.addmm(b[e], h, w[e]).relu_()
                else:
                    torch.addmm(b[e], h, w[e], out=out[j])
            inputs.append(seen)
        ctx.index, ctx.inputs, ctx.shared, ctx.x_shape = index, inputs, x.dim() == 2, x.shape
        ctx.save_for_backward(*weights)
        return out

    @staticmethod
    def backward(ctx, grad):
        weights = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        grad_w = [torch.zeros_like(w) if need_w else None for w in weights]
        grad_b = [w.new_zeros(w.shape[0], 1, w.shape[2]) if need_w else None for w in weights]
        grad_x = None
        for j, e in enumerate(ctx.index):
            g = grad[j]
            for k in reversed(range(len(weights))):
                h = ctx.inputs[j][k]
                if need_w:
                    torch.mm(h.T, g, out=grad_w[k][e])
                    torch.sum(g, 0, keepdim=True, out=grad_b[k][e])
                if k > 0:
                    g = torch.ops.aten.threshold_backward(g @ weights[k][e].T, h, 0)
                elif need_x:
                    g = g @ weights[0][e].T
                    if ctx.shared:
                        grad_x = g if grad_x is None else grad_x + g
                    else:
                        if grad_x is None:
                            grad_x = grad.new_empty(ctx.x_shape)  # row j: member j run
                        grad_x[j] = g
        ctx.inputs = None
        return (grad_x, None, *[t for pair in zip(grad_w, grad_b) for t in pair])


def one_node_forward(self: StackedMLP, x, members=None, detach=False):
    """StackedMLP.forward with the critic as one autograd node (same chunks, same results)."""
    if x.shape[-2] > self.chunk_rows:
        return torch.cat([self(c, members, detach) for c in x.split(self.chunk_rows, -2)], -2)
    index = tuple(range(self.num_members)[members or slice(None)])
    params = [t for layer in self.layers for t in (layer.weight, layer.bias)]
    return CriticOneNode.apply(x, index, *[p.detach() if detach else p for p in params])


def agents() -> dict[str, object]:
    """The benchmark's agents: TD3+BC (CORL) and SAC (paper.yaml's policy.sac)."""
    torch.manual_seed(0)
    td3bc = TD3BC(OBS, ACT)
    paper_sac = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())["policy"]["sac"]
    torch.manual_seed(0)  # the schedule's length: the benchmark's (OfflineRL-Kit's 3M updates)
    sac = SAC(OBS, ACT, from_dict(SACConfig, {**paper_sac, "actor_lr_schedule_steps": 3_000_000},
                                  where="policy.sac"))
    return {"td3bc": td3bc, "sac": sac}


def with_lever(agent, lever: str):
    """A copy of `agent` (same weights and optimiser state) with `lever` applied."""
    agent = copy.deepcopy(agent)
    if lever == "one-node critic":
        for twin in (agent.critic, agent.critic_target):
            twin.net.forward = types.MethodType(one_node_forward, twin.net)
    elif lever == "compiled nets":
        torch._inductor.config.fallback_random = True  # eager's random draws (SAC's actor)
        for twin in (agent.critic, agent.critic_target):
            twin.net = torch.compile(twin.net)
        agent.actor = torch.compile(agent.actor)
        if hasattr(agent, "actor_target"):
            agent.actor_target = torch.compile(agent.actor_target)
    elif lever != "current":
        raise ValueError(f"unknown lever {lever!r}")
    return agent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--updates", type=int, default=40, help="per round (even)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data, levers = timing_batch(BATCH, OBS, ACT), ["current", "one-node critic", "compiled nets"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, batch {BATCH}, "
          f"{args.rounds} rounds x {args.updates} updates, alternating\n")
    print("| agent | variant | ms / update | speed vs current [95 % CI] | compile s |")
    print("|---|---|---|---|---|")
    for name, base in agents().items():
        variants, compile_s, first = {}, {}, {}
        for lever in levers:
            t0 = time.perf_counter()
            variants[lever] = with_lever(base, lever)
            torch.manual_seed(1)  # the same noise draws for every variant's first updates
            first[lever] = variants[lever].update(data)
            for _ in range(3):  # warm-up: compiles the graphs, fills optimiser state
                variants[lever].update(data)
            compile_s[lever] = time.perf_counter() - t0
            differs = {k: v for k, v in first[lever].items()
                       if not np.isclose(v, first["current"][k], rtol=1e-4, atol=1e-6)}
            if differs:  # a lever must compute the same update
                raise RuntimeError(f"{name} with {lever}: first update differs: {differs} "
                                   f"vs {first['current']}")
        times = {lever: np.zeros(args.rounds) for lever in levers}
        for r in range(args.rounds):
            for lever, agent in variants.items():
                t0 = time.perf_counter()
                for _ in range(args.updates):
                    agent.update(data)
                times[lever][r] = (time.perf_counter() - t0) / args.updates
        for lever in levers:
            ms = 1e3 * times[lever].mean()
            if lever == "current":
                speed = "1"
            else:
                speed = "{:.2f}x [{:.2f}, {:.2f}]".format(
                    *paired_speedup(times["current"], times[lever]))
            comp = f"{compile_s[lever]:.1f}" if lever == "compiled nets" else ""
            print(f"| {name} | {lever} | {ms:.2f} | {speed} | {comp} |")


if __name__ == "__main__":
    main()
