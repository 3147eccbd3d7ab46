"""Network building blocks shared by agents and models."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def mlp(in_dim: int, out_dim: int, hidden: Sequence[int] = (256, 256),
        activation: type[nn.Module] = nn.ReLU, out_activation: nn.Module | None = None
        ) -> nn.Sequential:
    """Plain MLP: Linear-act-...-Linear (optionally followed by `out_activation`)."""
    layers: list[nn.Module] = []
    last = in_dim
    for width in hidden:
        layers += [nn.Linear(last, width), activation()]
        last = width
    layers.append(nn.Linear(last, out_dim))
    if out_activation is not None:
        layers.append(out_activation)
    return nn.Sequential(*layers)


class Standardizer(nn.Module):
    """x -> (x - mean) / std with statistics stored as buffers (saved with the model)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def fit(self, x: torch.Tensor) -> "Standardizer":
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp_min(self.eps))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std + self.mean


class StackedLinear(nn.Module):
    """E linear maps of one shape, laid out as baselines/ensemble.py's EnsembleLinear:
    weight (E, in, out), bias (E, 1, out); member e is `addmm(bias[e], x, weight[e])`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[2]


class StackedMLP(nn.Module):
    """E ReLU MLPs of one shape held in stacked weights (one tensor per layer, as
    baselines/ensemble.py holds its members): one optimiser tensor and one target-network
    lerp per layer for all members.

    The forward runs member after member (2-D `addmm` on views of the stacked weights), not one
    `baddbmm` over all: on one CPU thread the batched matmul gains nothing for E = 2, and on
    the large row counts of CQL's proposals its (E, R, 256) activations spill out of cache
    where one member's (R, 256) do not (measured per update, one thread: CQL ~12 % slower with
    `baddbmm`, SAC and TD3+BC ~4 %). Inputs of more than `chunk_rows` rows run in chunks of
    that many, so a layer's activation stays in a core's L2 cache (1024 x 256 float32 = 1 MiB;
    CQL's update at 3 x 256, N = 10, ~8000 critic rows: ~15 % faster than unchunked).

    Built from E plain `mlp`s, so each member keeps the initialisation (and the RNG draws) of
    the network it replaces; `member(i)` gives member i back as a plain MLP."""

    chunk_rows = 1024

    def __init__(self, members: Sequence[nn.Sequential]):
        super().__init__()
        linears = [[m for m in net if isinstance(m, nn.Linear)] for net in members]
        acts = {type(m) for net in members for m in net if not isinstance(m, nn.Linear)}
        if acts - {nn.ReLU} or any(not isinstance(net[-1], nn.Linear) for net in members):
            raise ValueError("StackedMLP stacks ReLU MLPs without an output activation")
        shapes = {tuple(tuple(l.weight.shape) for l in net) for net in linears}
        if len(shapes) != 1:
            raise ValueError(f"StackedMLP members differ in layer shapes: {sorted(shapes)}")
        self.layers = nn.ModuleList(
            StackedLinear(*stack_linear_params([l.weight for l in layer], [l.bias for l in layer]))
            for layer in zip(*linears))

    @property
    def num_members(self) -> int:
        return self.layers[0].weight.shape[0]

    def forward(self, x: torch.Tensor, members: slice | None = None, detach: bool = False
                ) -> torch.Tensor:
        """x (R, in) shared by the members, or (E', R, in) one input per member run ->
        (E', R, out), E' the number of members run.

        `members` runs a slice of the members only; `detach` uses the weights without
        recording their gradients (a loss that must reach only the input, as the actor's
        does through the critic, skips the weight-gradient matmuls)."""
        index = range(self.num_members)[members or slice(None)]
        if x.dim() == 3 and x.shape[0] != len(index):
            raise ValueError(f"StackedMLP: {x.shape[0]} inputs for the {len(index)} members "
                             f"run (members={members}); give one input per member run")
        if x.shape[-2] > self.chunk_rows:
            return torch.cat([self(c, members, detach) for c in x.split(self.chunk_rows, -2)],
                             -2)
        inputs = [x] * len(index) if x.dim() == 2 else x.unbind(0)
        params = [(layer.weight, layer.bias) for layer in self.layers]
        if detach:
            params = [(w.detach(), b.detach()) for w, b in params]
        params = [(w.unbind(0), b.unbind(0)) for w, b in params]  # one backward node each
        last, outs = len(params) - 1, []
        for e, h in zip(index, inputs):
            for k, (w, b) in enumerate(params):
                h = torch.addmm(b[e], h, w[e])
                if k < last:
                    h = h.relu_()  # in place: addmm's backward does not need its output
            outs.append(h)
        return torch.stack(outs)

    def member(self, i: int) -> nn.Sequential:
        """Member i as a plain MLP whose weights are views of the stacked ones: it reads the
        current values and its gradients reach this module's parameters."""
        layers: list[nn.Module] = []
        for layer in self.layers:
            # skip_init: no initialisation, so no draw from the global RNG
            linear = nn.utils.skip_init(nn.Linear, layer.in_features, layer.out_features)
            del linear.weight, linear.bias
            linear.weight, linear.bias = layer.weight[i].T, layer.bias[i, 0]
            layers += [linear, nn.ReLU()]
        return nn.Sequential(*layers[:-1])


def stack_linear_params(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.Linear weights (out, in) and biases (out,) of E members as a StackedLinear's
    (E, in, out) and (E, 1, out)."""
    return (torch.stack([w.detach().T for w in weights]).contiguous(),
            torch.stack([b.detach() for b in biases])[:, None, :].contiguous())
