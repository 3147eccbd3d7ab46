"""Ensemble training: one vectorised 7 x (4 x 200) ensemble vs a Python loop over 7 separate
nn.Sequential nets doing the same updates (group ensemble-train, side by side); MOPO rollout
throughput, 5000 starts x h = 5 (group ensemble-rollout; transitions/s in extra_info).

Run: .venv/bin/python -m pytest tests/benchmarks/test_bench_ensemble.py --benchmark-enable \
     --benchmark-only
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baselines.ensemble import EnsembleConfig, EnsembleDynamics, EnsembleNet, ensemble_loss, \
    nll_loss
from baselines.mopo import EnsembleRolloutGenerator, MOPOConfig
from harness.envs import halfcheetah_termination
from agents.sac import SAC

O, A = 11, 3           # hopper: inputs o + a, targets o + 1
B, BATCHES = 256, 10   # paper batch size; updates per measured round
CFG = EnsembleConfig()  # paper defaults: 7 members, 4 x 200, per-layer weight decay


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    n = B * BATCHES
    x, y = torch.randn(n, O + A, generator=g), torch.randn(n, O + 1, generator=g)
    order = torch.argsort(torch.rand(CFG.num_members, n, generator=g), 1)  # per-member order
    return x, y, order


class LoopMember(nn.Module):
    """One member as a plain nn.Sequential (same widths, init scale, soft logvar bounds)."""

    def __init__(self):
        super().__init__()
        dims = [O + A, *CFG.hidden, 2 * (O + 1)]
        layers = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.SiLU())
        self.net = nn.Sequential(*layers)
        self.max_logvar = nn.Parameter(torch.full((O + 1,), CFG.max_logvar_init))
        self.min_logvar = nn.Parameter(torch.full((O + 1,), CFG.min_logvar_init))
        self.decay = CFG.weight_decay

    def loss(self, x, y):
        mean, logvar = self.net(x).chunk(2, -1)
        logvar = self.max_logvar - F.softplus(self.max_logvar - logvar)
        logvar = self.min_logvar + F.softplus(logvar - self.min_logvar)
        linears = [m for m in self.net if isinstance(m, nn.Linear)]
        decay = sum(0.5 * wd * lin.weight.square().sum() for wd, lin in zip(self.decay, linears))
        return (nll_loss(mean[None], logvar[None], y[None]).sum() + decay
                + CFG.logvar_loss_coef * (self.max_logvar.sum() - self.min_logvar.sum()))


@pytest.mark.benchmark(group="ensemble-train")
def test_train_vectorised_ensemble(benchmark, data):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y, order = data
    net = EnsembleNet(O + A, O + 1, CFG)
    opt = torch.optim.Adam(net.parameters(), lr=CFG.lr)

    def run():
        for lo in range(0, order.shape[1], B):
            idx = order[:, lo:lo + B]  # (E, B): every member its own rows, one op per layer
            loss = ensemble_loss(net, x[idx], y[idx], CFG.logvar_loss_coef)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return loss.item()
    benchmark.extra_info["updates_per_round"] = BATCHES
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="ensemble-train")
def test_train_loop_over_members(benchmark, data):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y, order = data
    members = [LoopMember() for _ in range(CFG.num_members)]
    opts = [torch.optim.Adam(m.parameters(), lr=CFG.lr) for m in members]

    def run():
        for lo in range(0, order.shape[1], B):
            for e, (m, opt) in enumerate(zip(members, opts)):
                idx = order[e, lo:lo + B]
                loss = m.loss(x[idx], y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return loss.item()
    benchmark.extra_info["updates_per_round"] = BATCHES
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)


class Agent:
    """SAC actor at paper size (2 x 256) for the rollout benchmark."""

    def __init__(self, o, a):
        self.sac = SAC(o, a)

    def act(self, obs, deterministic=False):
        return self.sac.act(obs, deterministic)


@pytest.mark.benchmark(group="ensemble-rollout")
@pytest.mark.parametrize("penalty", ["aleatoric", "none"], ids=["mopo", "mbpo"])
def test_rollout_throughput(benchmark, penalty):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    o, a, n, h = 17, 6, 5000, 5  # halfcheetah dims: it never terminates, so all n*h are made
    net = EnsembleNet(o + a, o + 1, CFG)
    dyn = EnsembleDynamics(net, list(range(CFG.num_elites)), o, a, "halfcheetah-bench")
    cfg = MOPOConfig(rollout_length=h, rollout_batch_size=n, penalty=penalty)
    gen = EnsembleRolloutGenerator(dyn, halfcheetah_termination, cfg, seed=0)
    agent = Agent(o, a)
    start = torch.randn(n, o)
    out = benchmark.pedantic(gen.generate, args=(agent, start), rounds=3, iterations=1,
                             warmup_rounds=1)
    assert len(out["obs"]) == n * h  # halfcheetah never terminates: every step is kept
    benchmark.extra_info["transitions_per_call"] = len(out["obs"])
    if benchmark.stats is not None:  # None under --benchmark-disable (plain `make test`)
        benchmark.extra_info["transitions_per_s"] = len(out["obs"]) / benchmark.stats.stats.mean
