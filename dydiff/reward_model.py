"""DyDiff's separate reward model r(s, a): an MLP regressed on the dataset's rewards.

Defaults follow the authors' code (FineArtz/DyDiff: exp_specs/rew_model, rlkit/rew_model_trainer.py,
training/networks.py FlattenMLP): 2 hidden layers of 256 with ReLU, Adam lr 1e-4 (no weight
decay), batch 256, MSE, a random holdout of 20% of the transitions (at most 5000), one holdout
evaluation per epoch and early stopping after more than 7 evaluations without improvement
(epochs over shuffled data, no step limit), EDM `Linear` init (weights sqrt(1 / fan_in) N(0, 1),
biases 0; training/networks.py:28-47, their FlattenMLP's layers, :938-976), and the weights
of the last evaluation kept (`keep: last`: their trainer stores a reference to the live
state_dict as its "best", rlkit/rew_model_trainer.py:107-110,121-124, so it saves the last
weights). Variants: `weight_init: torch` (PyTorch's default init, the former), `keep: best`
(the best-holdout weights, what their code meant, the former). Differences kept, deliberate:
  * inputs (obs and actions) and the target are standardised with dataset statistics (the
    authors standardise observations only); the model maps back to raw reward units;
  * `train_steps` caps the number of gradient steps (None = until early stopping) and
    `early_stopping: false` gives plain fixed-step training.

Outputs in out_dir: model.pt (best weights, config, dims, summary), checkpoint.pt (exact
resume: weights, best weights, optimiser, RNG, data order, early-stopping state, metrics so
far), metrics.parquet (one row per holdout evaluation: step, train_loss, holdout_mse,
wall_time_s; both losses are MSEs in raw reward units).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from harness.config import from_dict, require
from harness.data.dataset import Dataset, holdout_split
from harness.nets import Standardizer, mlp
from agents.sac import init_weights_
from harness.checkpoint import CHECKPOINT, Checkpointer, load_checkpoint, save_checkpoint
from harness.runtime import start_training

MODEL = "model.pt"
COLUMNS = ["step", "train_loss", "holdout_mse"]  # + wall_time_s


@dataclass
class RewardModelConfig:
    hidden: list[int] = field(default_factory=lambda: [256, 256])
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 256
    holdout_ratio: float = 0.2
    max_holdout: int = 5000
    early_stopping: bool = True
    patience: int = 7                 # stop after more than `patience` evaluations w/o gain
    eval_every: int | None = None     # steps between holdout evaluations; None = one epoch
    train_steps: int | None = None    # gradient-step cap; None = until early stopping
    standardize_target: bool = True
    checkpoint_every: int = 5000      # steps (rounded up to the next evaluation)
    weight_init: Literal["edm", "torch"] = "edm"   # authors: EDM Linear; torch: the former
    keep: Literal["last", "best"] = "last"          # authors: last weights; best: the former

    def validate(self) -> None:
        require(len(self.hidden) >= 1 and all(h >= 1 for h in self.hidden), "hidden",
                f"must be a non-empty list of positive ints, got {self.hidden}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(0.0 <= self.holdout_ratio < 1.0, "holdout_ratio",
                f"must be in [0, 1), got {self.holdout_ratio}")
        require(self.max_holdout >= 1, "max_holdout", f"must be >= 1, got {self.max_holdout}")
        require(self.patience >= 0, "patience", f"must be >= 0, got {self.patience}")
        require(self.eval_every is None or self.eval_every >= 1, "eval_every",
                "must be >= 1 or null (one epoch)")
        require(self.train_steps is None or self.train_steps >= 1, "train_steps",
                "must be >= 1 or null (until early stopping)")
        require(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
        require(self.early_stopping or self.train_steps is not None, "train_steps",
                "must be set when early_stopping is false (training would never end)")
        require(not self.early_stopping or self.holdout_ratio > 0, "holdout_ratio",
                "must be > 0 with early_stopping (it watches the holdout MSE)")


class RewardModel(nn.Module):
    """r(s, a) in raw reward units: standardise [s, a], MLP, un-standardise the output."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int] | tuple[int, ...],
                 weight_init: str = "torch"):
        super().__init__()
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.inputs = Standardizer(obs_dim + act_dim)
        self.net = init_weights_(mlp(obs_dim + act_dim, 1, tuple(hidden)), weight_init)
        self.register_buffer("r_mean", torch.zeros(()))
        self.register_buffer("r_std", torch.ones(()))

    def standardized(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """The network's output in standardised target units, (M,)."""
        return self.net(self.inputs(torch.cat([obs, act], -1))).squeeze(-1)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return self.standardized(obs, act) * self.r_std + self.r_mean


def train_reward_model(dataset: Dataset, cfg: RewardModelConfig | dict, out_dir: str | Path,
                       seed: int = 0, log_fn: Callable[[dict, int], None] | None = None,
                       progress: bool = True, device: torch.device | str | None = None,
                       stop_at: int | None = None) -> dict:
    """Train (or resume) the reward model; returns a summary dict (also in model.pt).

    stop_at: return right after checkpointing the first evaluation at or after gradient step
    `stop_at` (simulates pre-emption in tests); model.pt is not written then.
    """
    if not isinstance(cfg, RewardModelConfig):
        cfg = from_dict(RewardModelConfig, cfg, where="models.reward")
    out_dir, device, rng = start_training(out_dir, seed, device)
    obs = torch.as_tensor(dataset.observations, device=device)
    act = torch.as_tensor(dataset.actions, device=device)
    rew = torch.as_tensor(dataset.rewards, device=device)
    # A permutation from the seeded numpy stream (its first draw); sorted index arrays.
    train_idx, ho_idx = map(np.sort, holdout_split(rng.permutation(len(dataset)),
                                                   cfg.holdout_ratio, cfg.max_holdout))
    if len(train_idx) == 0:
        raise ValueError(f"dataset {dataset.name} has {len(dataset)} transitions: none left "
                         f"for training after the holdout split")
    tr = torch.as_tensor(train_idx, device=device)
    ho = torch.as_tensor(ho_idx, device=device)
    steps_per_epoch = math.ceil(len(tr) / cfg.batch_size)
    eval_every = cfg.eval_every or steps_per_epoch

    model = RewardModel(dataset.obs_dim, dataset.act_dim, cfg.hidden, cfg.weight_init).to(device)
    # Statistics from the training split only, so the holdout stays unseen.
    model.inputs.fit(torch.cat([obs[tr], act[tr]], -1))
    if cfg.standardize_target:
        model.r_mean.copy_(rew[tr].mean())
        model.r_std.copy_(rew[tr].std().clamp_min(1e-6))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    order = torch.Generator().manual_seed(seed)  # data order, separate from the global RNG

    pending = []
    best = {"mse": math.inf, "step": 0, "state": copy.deepcopy(model.state_dict()), "bad": 0}
    perm, done = None, False
    ckpt = Checkpointer(out_dir / CHECKPOINT, {"config": dataclasses.asdict(cfg), "seed": seed},
                        every=cfg.checkpoint_every, what="reward", columns=COLUMNS)
    if ckpt.resumed:
        model.load_state_dict(ckpt.state["model"])
        opt.load_state_dict(ckpt.state["optimizer"])
        order.set_state(ckpt.state["order"])
        pending, best, done = ckpt.state["pending"], ckpt.state["best"], ckpt.state["done"]
        perm = None if ckpt.state["perm"] is None else ckpt.state["perm"].to(device)
    step = ckpt.start

    def state() -> dict:
        return {"model": model.state_dict(), "optimizer": opt.state_dict(),
                "order": order.get_state(), "pending": pending, "best": best, "perm": perm,
                "done": done}

    @torch.no_grad()
    def holdout_mse() -> float:
        if len(ho) == 0:
            return math.nan
        model.eval()
        mse = float(((model(obs[ho], act[ho]) - rew[ho]) ** 2).mean())
        model.train()
        return mse

    scale = float(model.r_std) ** 2  # standardised loss -> raw units
    bar = tqdm(total=cfg.train_steps, initial=step, disable=not progress, desc="reward model")
    model.train()
    while not done:
        k = step % steps_per_epoch
        if k == 0 or perm is None:  # a fresh shuffle each epoch (the authors' order)
            perm = torch.randperm(len(tr), generator=order).to(device)
        index = tr[perm[k * cfg.batch_size:(k + 1) * cfg.batch_size]]
        target = (rew[index] - model.r_mean) / model.r_std
        loss = ((model.standardized(obs[index], act[index]) - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        pending.append(loss.item() * scale)
        step += 1
        bar.update(1)
        at_cap = cfg.train_steps is not None and step >= cfg.train_steps
        if step % eval_every == 0 or at_cap:
            mse = holdout_mse()
            row = ckpt.log({"step": step, "train_loss": sum(pending) / len(pending),
                            "holdout_mse": mse})
            pending = []
            if mse < best["mse"]:
                best = {"mse": mse, "step": step, "state": copy.deepcopy(model.state_dict()),
                        "bad": 0}
            else:
                best["bad"] += 1
            done = at_cap or (cfg.early_stopping and best["bad"] > cfg.patience)
            bar.set_postfix(holdout_mse=f"{mse:.4g}", best=f"{best['mse']:.4g}")
            if log_fn is not None:
                log_fn({"reward_train_loss": row["train_loss"], "reward_holdout_mse": mse}, step)
            if ckpt.maybe_save(step, done, state, stop_at):
                bar.close()
                return {"steps": step, "interrupted": True}
    bar.close()
    # keep best: the best holdout weights (the final ones when there is no holdout to choose
    # by); keep last (authors): the weights of the last evaluation.
    final_state = best["state"] if len(ho) and cfg.keep == "best" else model.state_dict()
    var = float(rew[ho].var()) if len(ho) > 1 else math.nan
    summary = {"steps": step, "epochs": step / steps_per_epoch,
               "early_stopped": bool(cfg.early_stopping and best["bad"] > cfg.patience),
               "best_step": best["step"] if len(ho) else step,
               "holdout_mse": best["mse"] if len(ho) else math.nan,  # the best evaluation's
               "kept": cfg.keep, "kept_holdout_mse": (
                   (best["mse"] if cfg.keep == "best" else ckpt.rows[-1]["holdout_mse"])
                   if len(ho) and ckpt.rows else math.nan),
               "holdout_reward_var": var, "holdout_size": len(ho), "train_size": len(tr),
               "final_train_loss": ckpt.rows[-1]["train_loss"] if ckpt.rows else math.nan,
               "parameters": sum(p.numel() for p in model.net.parameters()),
               "wall_time_s": ckpt.rows[-1]["wall_time_s"] if ckpt.rows else 0.0}
    save_checkpoint(out_dir / MODEL, {
        "model": final_state, "config": dataclasses.asdict(cfg), "obs_dim": dataset.obs_dim,
        "act_dim": dataset.act_dim, "name": dataset.name, "summary": summary})
    return summary


def load_reward_model(out_dir: str | Path, device: torch.device | str = "cpu") -> RewardModel:
    """The trained r(s, a) from out_dir/model.pt, in eval mode without gradients:
    model(obs (M, o), act (M, a)) -> (M,) rewards in raw units."""
    path = Path(out_dir) / MODEL
    state = load_checkpoint(path)
    if state is None:
        raise FileNotFoundError(f"no reward model at {path}"
                                " (run `dydiff-bench train-model --model reward` first)")
    cfg = from_dict(RewardModelConfig, state["config"], where=f"{path}:config")
    model = RewardModel(state["obs_dim"], state["act_dim"], cfg.hidden)
    model.load_state_dict(state["model"])
    return model.to(device).eval().requires_grad_(False)


__all__ = ["RewardModelConfig", "RewardModel", "train_reward_model", "load_reward_model"]
