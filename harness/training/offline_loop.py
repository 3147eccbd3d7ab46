"""The one offline training loop every method shares; methods differ only in the generator.

Each gradient step trains on a batch of `real_ratio * B` dataset transitions plus the rest from
a FIFO buffer of model rollouts (MOPO/MBPO/DyDiff); `real_ratio = 1` is model-free (TD3+BC,
CQL). Every `rollout_freq` steps the generator rolls out the current agent from start states
drawn from the dataset. The loop evaluates in the simulator, logs mean losses, and writes
`metrics.parquet` and a `checkpoint.pt` atomically; a restarted run resumes from the checkpoint
with weights, optimisers, buffers, every RNG stream and the metrics so far, so that an
interrupted run ends with the same numbers as an uninterrupted one (same seed, CPU).
"""
from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import pandas as pd
import torch
from tqdm.auto import tqdm

from harness.config import require
from harness.data.dataset import Dataset
from harness.training.buffers import KEYS, RealBuffer, RingBuffer
from harness.training.evaluation import evaluate
from harness.checkpoint import CHECKPOINT, Checkpointer
from harness.levers import levers, tf32_flags
from harness.runtime import device_of, seed_everything

# The model buffer's rows, written once each (harness.training.buffers.RowStore), beside the
# checkpoint that holds the rest of the loop's state.
MODEL_BUFFER = "model_buffer"

log = logging.getLogger(__name__)


@dataclass
class OfflineConfig:
    total_steps: int = 1_000_000
    batch_size: int = 256
    real_ratio: float = 1.0          # 1.0 = model-free; MOPO 0.05, DyDiff 0.6
    # Real rows per batch: round(real_ratio * B) (256 x 0.6: 154 + 102 model rows), or int(...)
    # as the DyDiff authors' trainer (rlkit/trainer.py:197-198: 153 + 103).
    real_batch_rule: Literal["round", "int"] = "round"
    rollout_freq: int = 1000         # generator call every this many gradient steps
    model_retain_epochs: int = 5     # model buffer holds this many generator calls ...
    model_buffer_size: int | None = None  # ... unless given here in transitions (DyDiff: 2e6)
    eval_every: int = 5000           # CORL's eval_freq
    eval_episodes: int = 10
    log_every: int = 1000
    checkpoint_every: int = 10_000

    def validate(self) -> None:
        for key in ("total_steps", "batch_size", "rollout_freq", "model_retain_epochs",
                    "eval_every", "eval_episodes", "log_every",
                    "checkpoint_every"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        require(self.model_buffer_size is None or self.model_buffer_size >= 1,
                "model_buffer_size", f"must be >= 1 or null, got {self.model_buffer_size}")
        require(0.0 <= self.real_ratio <= 1.0, "real_ratio",
                f"must be in [0, 1], got {self.real_ratio}")

    @property
    def n_real(self) -> int:
        x = self.real_ratio * self.batch_size
        return int(round(x)) if self.real_batch_rule == "round" else int(x)


def eval_seed(seed: int, step: int) -> int:
    """Env seed of the evaluation at `step`: fresh start states at each evaluation."""
    return seed * 100_003 + step


def _rollout(generator, agent, real: RealBuffer, model: RingBuffer, n_start: int) -> dict:
    """One generator call into the model buffer; returns scalar stats it reported."""
    out = generator.generate(agent, real.sample_obs(n_start))
    model.add({k: out[k] for k in KEYS})
    stats = {"rollout_transitions": float(len(out["obs"]))}
    for k, v in out.items():  # extra scalar outputs (e.g. MOPO's mean penalty) are logged
        if k not in KEYS and (isinstance(v, (int, float)) or
                              (torch.is_tensor(v) and v.numel() == 1)):
            stats[f"rollout_{k}"] = float(v)
    return stats


# Leading metrics columns; the losses follow, sorted, then wall_time_s.
FIRST = ("step", "return_mean", "return_std", "normalized_score", "normalized_score_std")


def offline_loop(agent, dataset: Dataset, cfg: OfflineConfig, out_dir, seed: int,
                 generator=None, log_fn: Callable[[dict, int], None] | None = None,
                 progress: bool = True, stop_at: int | None = None) -> pd.DataFrame:
    """Train `agent` offline for `cfg.total_steps` gradient steps; return the metrics table.

    generator: None (model-free) or an object with `generate(agent, start_obs) -> dict`,
      `rollout_batch_size` (start states it wants per call: its own setting, the only one) and
      `max_transitions_per_call` (optionally `state_dict`/`load_state_dict` for its own state).
    stop_at: return right after checkpointing gradient step `stop_at` (simulates pre-emption;
      tests).
    Rows of the table: step, return_mean, return_std, normalized_score, mean losses since the
    last row, wall_time_s (training time so far, summed across restarts).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if generator is None and cfg.real_ratio < 1.0:
        raise ValueError(f"offline.real_ratio={cfg.real_ratio} < 1 needs a rollout generator "
                         f"(model-based method); model-free methods use real_ratio 1.0")
    dev = device_of(agent)
    real = RealBuffer(dataset, seed=seed, device=dev)
    model = None
    if generator is not None and cfg.real_ratio < 1.0:
        per_call = getattr(generator, "max_transitions_per_call", None)
        if per_call is None:
            raise AttributeError(f"{type(generator).__name__} must expose "
                                 f"`max_transitions_per_call` (sizes the model buffer)")
        capacity = (cfg.model_buffer_size if cfg.model_buffer_size is not None
                    else cfg.model_retain_epochs * int(per_call))
        model = RingBuffer(capacity, dataset.obs_dim, dataset.act_dim, seed=seed + 1, device=dev,
                           store=out_dir / MODEL_BUFFER)
    elif generator is not None:
        log.warning("offline.real_ratio is 1.0: the rollout generator is never used")
    n_real = cfg.n_real if model is not None else cfg.batch_size

    sums: dict[str, float] = defaultdict(float)   # losses since the last log row
    counts: dict[str, int] = defaultdict(int)
    ckpt = Checkpointer(out_dir / CHECKPOINT, {"config": dataclasses.asdict(cfg), "seed": seed},
                        every=cfg.checkpoint_every, what="offline", columns=FIRST, device=dev)
    if ckpt.resumed:
        agent.load_training_state(ckpt.state["agent"])
        real.load_state_dict(ckpt.state["real_buffer"])
        if model is not None:
            model.load_state_dict(ckpt.state["model_buffer"])
        if generator is not None and ckpt.state.get("generator") is not None:
            generator.load_state_dict(ckpt.state["generator"])
        sums.update(ckpt.state["sums"])
        counts.update(ckpt.state["counts"])
    else:
        seed_everything(seed)
        if model is not None:
            model.store.clear()
    start = ckpt.start
    if start >= cfg.total_steps:
        return ckpt.table()

    def state() -> dict:
        return {"agent": agent.training_state(), "real_buffer": real.state_dict(),
                "model_buffer": model.state_dict() if model is not None else None,
                "generator": (generator.state_dict()
                              if hasattr(generator, "state_dict") else None),
                "sums": dict(sums), "counts": dict(counts)}

    agent_precision = levers().agents
    bar = tqdm(total=cfg.total_steps, initial=start, disable=not progress,
               desc=f"train {dataset.name}", dynamic_ncols=True)
    for step in range(start + 1, cfg.total_steps + 1):
        if model is not None and (step - 1) % cfg.rollout_freq == 0:
            with torch.no_grad():
                stats = _rollout(generator, agent, real, model, generator.rollout_batch_size)
            for k, v in stats.items():
                sums[k] += v
                counts[k] += 1

        if model is not None and len(model) > 0 and n_real < cfg.batch_size:
            r, m = real.sample(n_real), model.sample(cfg.batch_size - n_real)
            batch = {k: torch.cat([r[k], m[k]]) for k in KEYS}
        else:  # model-free, or the generator has returned nothing yet
            batch = real.sample(cfg.batch_size)
        with tf32_flags(agent_precision):  # the job's `levers.agents`
            losses = agent.update(batch)
        for k, v in losses.items():
            sums[k] += v
            counts[k] += 1

        row: dict = {}
        if step % cfg.log_every == 0:
            row.update({k: sums[k] / counts[k] for k in sums})
            sums.clear()
            counts.clear()
        if step % cfg.eval_every == 0 or step == cfg.total_steps:
            res = evaluate(agent, dataset.name, cfg.eval_episodes, seed=eval_seed(seed, step),
                           model=dataset.extra.get("sim_model"))
            row.update(return_mean=res["return_mean"], return_std=res["return_std"],
                       normalized_score=res["normalized_score"],
                       normalized_score_std=res["normalized_score_std"])
            bar.set_postfix(score=f"{res['normalized_score']:.1f}")
        if row:
            row = ckpt.log({"step": step, **row})
            if log_fn is not None:
                log_fn({k: v for k, v in row.items() if k != "step"}, step)
        bar.update(1)
        if ckpt.maybe_save(step, step == cfg.total_steps, state, stop_at):
            break
    bar.close()
    return ckpt.table()
