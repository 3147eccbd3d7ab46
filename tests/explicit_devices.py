"""A check for device-agnostic code that needs no GPU: inside `explicit_devices()` a tensor
factory called without `device=` raises. On a CPU-only machine every tensor lands on the CPU
whatever the code says, so a `torch.zeros(n)` that would sit on the wrong device on a GPU job
goes unnoticed; this makes it fail on CPU, in CI. Module construction is left out: parameters
are made on the CPU and moved with `.to(device)`. (The `meta` device cannot stand in for a GPU
here: the loops under test read numbers back, `.item()` and MuJoCo, which meta tensors lack.)"""
from __future__ import annotations

import contextlib
import sys
import traceback

import torch
from torch.overrides import TorchFunctionMode

# Factories that place a new tensor and take `device=`; *_like and .new_* follow their input.
FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full,
             torch.arange, torch.linspace, torch.eye, torch.rand, torch.randn, torch.randint,
             torch.randperm, torch.normal}


def _building_a_module() -> bool:
    """Inside an nn.Module's __init__: parameters are made on the CPU and moved with .to()."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "__init__" and isinstance(frame.f_locals.get("self"),
                                                             torch.nn.Module):
            return True
        frame = frame.f_back
    return False


class _Explicit(TorchFunctionMode):
    def __init__(self, allow: tuple[str, ...]):
        super().__init__()
        self.allow, self.calls = allow, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            where = traceback.extract_stack()[-2]
            if not any(a in where.filename for a in self.allow) and not _building_a_module():
                self.calls.append(f"{func.__name__} without device= at "
                                  f"{where.filename.split('/')[-2]}/{where.filename.split('/')[-1]}"
                                  f":{where.lineno}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def explicit_devices(allow: tuple[str, ...] = ("site-packages", "/tests/")):
    """Fail (AssertionError listing every place) if the code run inside calls a tensor factory
    without `device=`; code under `allow` (libraries, the tests' own fixtures) is not checked."""
    mode = _Explicit(allow)
    with mode:
        yield mode
    calls = sorted(set(mode.calls))
    assert not calls, "tensor factories without device=:\n  " + "\n  ".join(calls)
