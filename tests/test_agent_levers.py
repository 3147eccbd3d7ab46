"""scripts/agent_levers.py's hand-written critic backward computes autograd's gradients, so
its timing compares like with like (docs/performance.md)."""
import importlib.util
import types
from pathlib import Path

import pytest
import torch

from harness.nets import StackedMLP, mlp

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "agent_levers.py"


@pytest.fixture(scope="module")
def levers():
    spec = importlib.util.spec_from_file_location("agent_levers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("members,detach", [(None, False), (slice(0, 1), True),
                                            (slice(1, 2), False)])
def test_one_node_critic_matches_autograd(levers, shared, members, detach):
    torch.manual_seed(0)
    net = StackedMLP([mlp(5, 1, [7, 6]).double() for _ in range(2)])
    lever = StackedMLP([mlp(5, 1, [7, 6]).double() for _ in range(2)])
    lever.load_state_dict(net.state_dict())
    lever.forward = types.MethodType(levers.one_node_forward, lever)
    lever.chunk_rows = net.chunk_rows = 8  # 20 rows: the chunked path too
    run = 2 if members is None else 1
    x = torch.randn(*((20, 5) if shared else (run, 20, 5)), dtype=torch.float64)
    weights = torch.randn(run, 20, 1, dtype=torch.float64)
    grads = []
    for model in (net, lever):
        xi = x.clone().requires_grad_(True)
        out = model(xi, members, detach)
        (out * weights).sum().backward()
        grads.append((out.detach(), xi.grad, [p.grad for p in model.parameters()]))
    (out_a, gx_a, gp_a), (out_b, gx_b, gp_b) = grads
    torch.testing.assert_close(out_b, out_a)
    torch.testing.assert_close(gx_b, gx_a)
    for a, b in zip(gp_a, gp_b):
        if detach:
            assert a is None and b is None
        else:  # members outside the slice get zero gradients from the lever, none from autograd
            torch.testing.assert_close(b, a if a is not None else torch.zeros_like(b))


def test_stacked_mlp_names_a_mismatch_of_inputs_and_members():
    net = StackedMLP([mlp(5, 1, [7]) for _ in range(2)])
    with pytest.raises(ValueError, match="2 inputs for the 1 members run"):
        net(torch.randn(2, 4, 5), slice(1, 2))
