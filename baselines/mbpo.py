"""MBPO-style offline baseline (Janner et al. 2019, as run offline in the MOPO paper): the MOPO
generator with the uncertainty penalty switched off (penalty 'none', coefficient 0).

The rollout section is validated as a MOPOConfig; any penalty settings in it are overridden,
because the job spec always carries MOPOConfig's defaults and cannot tell them from user input.
"""
from __future__ import annotations

from pathlib import Path

import torch

from baselines import mopo
from baselines.mopo import MOPOConfig
from dydiff.data.dataset import Dataset


def make_generator(dataset: Dataset, cfg: dict | MOPOConfig, model_dirs: dict[str, Path],
                   device: torch.device | str = "cpu", seed: int | None = None
                   ) -> mopo.EnsembleRolloutGenerator:
    return mopo.make_generator(dataset, mopo.without_penalty(cfg), model_dirs, device, seed)


__all__ = ["make_generator"]
