"""Job step: train one registered model (ensemble, reward, diffusion, ...) on a task's dataset."""
from __future__ import annotations

from pathlib import Path

from harness import registry
from harness.config import from_dict
from harness.data.sources import load_dataset


def train_model_step(spec: dict, log_fn=None) -> dict:
    model = registry.MODELS[spec["model"]]
    cfg = from_dict(registry.resolve(model.config), spec["config"]["model"],
                    where=f"models.{model.name}")
    train = registry.resolve(model.train)
    return train(load_dataset(spec["dataset"]), cfg, Path(spec["out"]),
                 seed=spec["config"]["seed"], log_fn=log_fn, progress=True)
