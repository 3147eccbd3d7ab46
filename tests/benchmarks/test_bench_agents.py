"""Gradient updates per second at batch 256 (CPU, one thread) for the offline agents."""
import pytest
import torch

from agents.cql import CQL
from agents.sac import SAC
from agents.td3bc import TD3BC

O, A, B = 17, 6, 256  # halfcheetah / walker2d sizes


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return {"obs": torch.randn(B, O, generator=g), "actions": torch.rand(B, A, generator=g) * 2 - 1,
            "rewards": torch.randn(B, generator=g), "next_obs": torch.randn(B, O, generator=g),
            "terminals": torch.zeros(B)}


@pytest.mark.benchmark(group="agent-update")
@pytest.mark.parametrize("agent_cls", [TD3BC, CQL, SAC], ids=["td3bc", "cql", "sac"])
def test_update_throughput(benchmark, agent_cls, batch):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    agent = agent_cls(O, A)  # paper defaults (CQL: 3x256 hidden)
    info = benchmark.pedantic(agent.update, args=(batch,), rounds=20, iterations=1,
                              warmup_rounds=3)
    assert all(torch.isfinite(torch.tensor(v)) for v in info.values())
