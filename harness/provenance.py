"""What produced a result: the installed software and the device, recorded with every result.

`environment()` goes into final.json, eval.json, every dataset's hdf5 attrs and every MLflow run
(tags `env.<package>`), so an analysis can tell when the runs it combines came from different
environments (a MuJoCo release changes contact physics: docs/physics-drift.md). The digest
covers every installed distribution, so two runs with the same digest ran the same packages.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import platform

# The packages a result's numbers depend on most, named in every record; the digest covers
# the rest.
KEY_PACKAGES = ("torch", "mujoco", "gymnasium", "gymnasium-robotics", "numpy", "h5py",
                "mlflow", "snakemake", "rliable")


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


@functools.lru_cache(maxsize=1)
def installed() -> dict[str, str]:
    """Every installed distribution: canonical name -> version."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[_canonical(name)] = dist.version
    return dict(sorted(found.items()))


@functools.lru_cache(maxsize=1)
def environment() -> dict:
    """{"python", "packages": {KEY_PACKAGES: version or None}, "torch_cuda", "packages_digest"}.
    The project's own distribution is left out of the digest (its code is the git sha)."""
    import torch
    every = {k: v for k, v in installed().items() if k != "dydiff-bench"}
    listing = "\n".join(f"{k}=={v}" for k, v in every.items())
    return {"python": platform.python_version(),
            "packages": {name: every.get(name) for name in KEY_PACKAGES},
            "torch_cuda": torch.version.cuda,
            "packages_digest": hashlib.sha256(listing.encode()).hexdigest()}


def mlflow_tags(env: dict | None = None) -> dict[str, str]:
    """The environment as flat MLflow tags: env.python, env.<package>, env.torch_cuda,
    env.packages_digest."""
    env = env or environment()
    tags = {"env.python": env["python"], "env.torch_cuda": str(env["torch_cuda"]),
            "env.packages_digest": env["packages_digest"]}
    tags.update({f"env.{k}": str(v) for k, v in env["packages"].items()})
    return tags
