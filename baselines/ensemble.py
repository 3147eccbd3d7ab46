"""Probabilistic ensemble dynamics + reward model (PETS / MBPO / MOPO), vectorised over members.

Each of E members is a Gaussian MLP  [obs, act] -> N(mean, diag(exp(logvar)))  over the target
[next_obs - obs, reward]. All members live in the same tensors: an `EnsembleLinear` layer holds
weight (E, in, out) and bias (E, 1, out) and runs every member in one `torch.baddbmm` on
(E, B, in), so one optimiser step trains the whole ensemble.

Defaults are MBPO's / MOPO's (Janner et al. 2019; Yu et al. 2020; as in OfflineRL-Kit): 7 members,
5 elites, 4 x 200 swish layers, per-layer weight decay (2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4) added
to the loss as wd * ||W||^2 / 2, Adam lr 1e-3, batch 256, a holdout of 20 % of the data (at most
5000 rows), early stopping once no member improved its holdout MSE by more than 1 % for 5 epochs,
per-member best-epoch snapshots, elites = the members with the lowest holdout MSE.

Choices worth knowing:
* Inputs are standardised with statistics of the training split (stored in the model).
  Targets are NOT standardised, as in MBPO / MOPO / OfflineRL-Kit: the holdout MSE, the
  early-stopping rule and the learned variances are all in raw units (delta obs, reward), so
  the MOPO penalty ||std|| has the scale the published lambda values were tuned for.
* logvar is soft-bounded by learned max_logvar / min_logvar (PETS): logvar = max - softplus(
  max - logvar), then min + softplus(logvar - min); both bounds are shared by the members and
  pulled together by 0.01 * (sum max_logvar - sum min_logvar) in the loss.
* Loss per step: sum over members of the Gaussian NLL (without constants, mean over batch and
  dims) + weight decay + the logvar-bound term. Each member trains on its own bootstrap sample
  of the training rows (n_train rows drawn with replacement once, before the first epoch),
  shuffled anew every epoch, as MOPO's mopo/models/bnn.py:405,430 and OfflineRL-Kit's
  offlinerlkit/dynamics/ensemble_dynamics.py:129,148 do; `sampling: permutation` (a named
  variant) gives every member all rows in its own order instead.
* Snapshots cover the member-indexed parameters (layer weights/biases); the shared logvar
  bounds keep their final values (as in OfflineRL-Kit).
* `DyDiffEnsembleConfig` is the DyDiff authors' recipe of the same model (the `ensemble-dydiff`
  model DyDiff starts its rollouts from): no reward head, standardised-state targets, Adam's
  weight decay, the mean of the members' losses, constant logvar bounds, any-improvement early
  stopping and the last epoch's weights. Each difference is a named EnsembleConfig setting
  whose default keeps MOPO / MBPO's model unchanged.

Outputs of `train_ensemble` in out_dir: checkpoint.pt (exact resume: weights, optimiser, best
snapshots, RNG streams, epoch, early-stopping state, metrics), metrics.parquet (one row per
epoch) and model.pt (best snapshots, elites, normaliser; `load_ensemble` reads it).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from harness.config import from_dict, require
from harness.data.dataset import Dataset, holdout_split
from harness.nets import Standardizer
from harness.checkpoint import CHECKPOINT, Checkpointer, load_checkpoint, save_checkpoint
from harness.runtime import start_training

MODEL = "model.pt"
METRIC_COLUMNS = ["epoch", "train_loss", "holdout_mse", "holdout_mse_elites"]  # + wall_time_s


@dataclass
class EnsembleConfig:
    num_members: int = 7
    num_elites: int = 5
    hidden: list[int] = field(default_factory=lambda: [200, 200, 200, 200])
    # One value per linear layer (len(hidden) + 1), applied as wd * ||W||^2 / 2 (biases free).
    weight_decay: list[float] = field(
        default_factory=lambda: [2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4])
    lr: float = 1e-3
    batch_size: int = 256
    holdout_ratio: float = 0.2
    max_holdout: int = 5000
    patience: int = 5                # epochs without any member improving before stopping
    min_improvement: float = 0.01    # relative holdout-MSE improvement that counts (1 %)
    max_epochs: int | None = None    # None = until early stopping
    logvar_loss_coef: float = 0.01
    max_logvar_init: float = 0.5
    min_logvar_init: float = -10.0
    # bootstrap: each member's rows drawn with replacement once (MOPO, OfflineRL-Kit), the same
    # rows every epoch in a new order; bootstrap_permuted: the same draw of positions indexes a
    # freshly permuted training set every epoch (DyDiff's authors), so a member's rows change
    # from epoch to epoch; permutation: every member sees every row (a variant).
    sampling: Literal["bootstrap", "bootstrap_permuted", "permutation"] = "bootstrap"
    # The targets end with the reward (MOPO / MBPO take their rewards from it); false: next
    # states only (DyDiff, whose rewards come from its own reward model).
    reward_head: bool = True
    # raw: inputs [obs, act] standardised with the training split's statistics, targets raw
    # [next_obs - obs, reward]. standardized_obs: observations standardised with the whole
    # dataset's mean and population std (+ 1e-6), actions raw, targets the deltas of the
    # standardised observations (reward raw). Predictions are in raw units either way.
    target_space: Literal["raw", "standardized_obs"] = "raw"
    # Weights each member ends with: best = its best-holdout epoch's; last = the last epoch's.
    keep: Literal["best", "last"] = "best"
    # mbpo: truncated normal, std 1 / (2 sqrt(fan_in)); torch_3d: torch's default Linear init
    # applied to the stacked (E, in, out) tensor, whose fan_in torch takes as in * out.
    weight_init: Literal["mbpo", "torch_3d"] = "mbpo"
    # loss: wd * ||W||^2 / 2 of the weights added to the loss; adam: Adam's (coupled)
    # weight_decay on each layer's weights and biases.
    weight_decay_form: Literal["loss", "adam"] = "loss"
    member_loss: Literal["sum", "mean"] = "sum"   # how the members' NLLs add up in the loss
    # true: max_logvar / min_logvar are trained (PETS); false: constants at their init values.
    learned_logvar_bounds: bool = True
    log_every: int = 1               # epochs between log_fn calls / progress-bar updates
    checkpoint_every: int = 1        # epochs between checkpoints

    def validate(self) -> None:
        require(self.num_members >= 1, "num_members", f"must be >= 1, got {self.num_members}")
        require(1 <= self.num_elites <= self.num_members, "num_elites",
                f"must be in [1, num_members={self.num_members}], got {self.num_elites}")
        require(len(self.hidden) >= 1 and all(h >= 1 for h in self.hidden), "hidden",
                f"must be a non-empty list of positive widths, got {self.hidden}")
        require(len(self.weight_decay) == len(self.hidden) + 1, "weight_decay",
                f"needs one value per linear layer (len(hidden) + 1 = {len(self.hidden) + 1}),"
                f" got {len(self.weight_decay)}")
        require(all(w >= 0 for w in self.weight_decay), "weight_decay",
                f"values must be >= 0, got {self.weight_decay}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(0.0 < self.holdout_ratio < 1.0, "holdout_ratio",
                f"must be in (0, 1), got {self.holdout_ratio}")
        require(self.max_holdout >= 1, "max_holdout", f"must be >= 1, got {self.max_holdout}")
        require(self.patience >= 1, "patience", f"must be >= 1, got {self.patience}")
        require(0.0 <= self.min_improvement < 1.0, "min_improvement",
                f"must be in [0, 1), got {self.min_improvement}")
        require(self.max_epochs is None or self.max_epochs >= 1, "max_epochs",
                f"must be >= 1 or null, got {self.max_epochs}")
        require(self.logvar_loss_coef >= 0, "logvar_loss_coef",
                f"must be >= 0, got {self.logvar_loss_coef}")
        require(self.min_logvar_init < self.max_logvar_init, "min_logvar_init",
                f"must be < max_logvar_init ({self.max_logvar_init}), got {self.min_logvar_init}")
        require(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        require(self.checkpoint_every >= 1, "checkpoint_every",
                f"must be >= 1, got {self.checkpoint_every}")


@dataclass
class DyDiffEnsembleConfig(EnsembleConfig):
    """The single-step ensemble DyDiff starts its policy injection from, as its authors train
    it (FineArtz/DyDiff exp_specs/dyn_model/*.yaml, rlkit/dynamics_model_trainer.py,
    training/networks.py BNN; lines in baselines/reference_settings.yaml models.ensemble-dydiff).
    The same 7 x (4 x 200 SiLU) Gaussian members, 5 elites, per-layer weight decay, batch 256
    and holdout rule as MOPO's; these defaults differ."""
    lr: float = 1e-4
    max_holdout: int = 5000
    # The authors stop once their counter of epochs without any improvement exceeds 7
    # (`patience > early_stopping_patience`): after 8 such epochs, patience 8 here.
    patience: int = 8
    min_improvement: float = 0.0     # any improvement of a member's best holdout MSE counts
    sampling: Literal["bootstrap", "bootstrap_permuted", "permutation"] = "bootstrap_permuted"
    reward_head: bool = False
    target_space: Literal["raw", "standardized_obs"] = "standardized_obs"
    # Their `_save_state` keeps references to the live weights, so the final ones are kept.
    keep: Literal["best", "last"] = "last"
    weight_init: Literal["mbpo", "torch_3d"] = "torch_3d"
    weight_decay_form: Literal["loss", "adam"] = "adam"
    member_loss: Literal["sum", "mean"] = "mean"
    learned_logvar_bounds: bool = False


def target_dim(cfg: EnsembleConfig, obs_dim: int) -> int:
    """Outputs per member: the state deltas, plus the reward with a reward head."""
    return obs_dim + int(cfg.reward_head)


# ---- the vectorised network -----------------------------------------------------------------

class EnsembleLinear(nn.Module):
    """E independent linear maps in one op: (E, B, in) -> (E, B, out)."""

    def __init__(self, members: int, in_dim: int, out_dim: int,
                 init: Literal["mbpo", "torch_3d"] = "mbpo"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, in_dim, out_dim))
        self.bias = nn.Parameter(torch.zeros(members, 1, out_dim))
        if init == "mbpo":  # MBPO's: truncated normal, std 1 / (2 sqrt(fan_in)), cut at 2 std
            std = 1.0 / (2.0 * math.sqrt(in_dim))
            nn.init.trunc_normal_(self.weight, std=std, a=-2 * std, b=2 * std)
        elif init == "torch_3d":
            # kaiming_uniform_(a=sqrt(5)) and nn.Linear's bias rule on the (E, in, out) tensor
            # (DyDiff's EnsembleLinear): torch reads its fan_in as in * out, so both are
            # U(-b, b) with b = 1 / sqrt(in * out).
            bound = 1.0 / math.sqrt(in_dim * out_dim)
            nn.init.uniform_(self.weight, -bound, bound)
            nn.init.uniform_(self.bias, -bound, bound)
        else:
            raise ValueError(f"init must be 'mbpo' or 'torch_3d', got {init!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class EnsembleNet(nn.Module):
    """Input standardiser + E Gaussian MLPs with swish activations and soft logvar bounds.

    Outputs are in target units; `target_scale` (out,) maps them to raw units (ones for
    target_space raw; the observation std for standardized_obs)."""

    def __init__(self, in_dim: int, out_dim: int, cfg: EnsembleConfig):
        super().__init__()
        self.members, self.out_dim = cfg.num_members, out_dim
        self.member_loss = cfg.member_loss
        self.decay_in_loss = cfg.weight_decay_form == "loss"
        dims = [in_dim, *cfg.hidden, 2 * out_dim]
        self.layers = nn.ModuleList(EnsembleLinear(cfg.num_members, a, b, cfg.weight_init)
                                    for a, b in zip(dims[:-1], dims[1:]))
        bounds = (torch.full((1, 1, out_dim), cfg.max_logvar_init),
                  torch.full((1, 1, out_dim), cfg.min_logvar_init))
        if cfg.learned_logvar_bounds:
            self.max_logvar, self.min_logvar = (nn.Parameter(b) for b in bounds)
        else:  # constants (saved with the model, never in the optimiser)
            self.register_buffer("max_logvar", bounds[0])
            self.register_buffer("min_logvar", bounds[1])
        self.register_buffer("weight_decay", torch.tensor(cfg.weight_decay, dtype=torch.float32))
        self.register_buffer("target_scale", torch.ones(out_dim))
        self.input_norm = Standardizer(in_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x raw inputs (B, in) shared by all members or (E, B, in) one batch per member ->
        mean, logvar each (E, B, out)."""
        h = self.input_norm(x)
        if h.dim() == 2:
            h = h.expand(self.members, *h.shape)
        for layer in self.layers[:-1]:
            h = F.silu(layer(h))
        mean, logvar = self.layers[-1](h).chunk(2, dim=-1)
        logvar = self.max_logvar - F.softplus(self.max_logvar - logvar)
        logvar = self.min_logvar + F.softplus(logvar - self.min_logvar)
        return mean, logvar

    def decay_loss(self) -> torch.Tensor:
        sq = torch.stack([layer.weight.square().sum() for layer in self.layers])
        return 0.5 * (self.weight_decay * sq).sum()

    def member_parameters(self) -> dict[str, torch.Tensor]:
        """Parameters indexed by member on dim 0 (what per-member snapshots cover)."""
        return {name: p for name, p in self.named_parameters() if name.startswith("layers.")}


def nll_loss(mean: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Gaussian NLL without constants, mean over batch and dims: (E,B,D) x3 -> (E,)."""
    return ((mean - target).square() * torch.exp(-logvar) + logvar).mean(dim=(1, 2))


def ensemble_loss(net: EnsembleNet, x: torch.Tensor, y: torch.Tensor,
                  logvar_loss_coef: float) -> torch.Tensor:
    """The training objective for one batch per member: x (E,B,in), y (E,B,out) in target
    units. With weight_decay_form adam the decay is the optimiser's, not part of this loss."""
    mean, logvar = net(x)
    nll = nll_loss(mean, logvar, y)
    loss = (nll.mean() if net.member_loss == "mean" else nll.sum()) + logvar_loss_coef * (
        net.max_logvar.sum() - net.min_logvar.sum())
    return loss + net.decay_loss() if net.decay_in_loss else loss


def make_optimizer(net: EnsembleNet, cfg: EnsembleConfig) -> torch.optim.Adam:
    """Adam over the trainable parameters; with weight_decay_form adam each layer (weights and
    biases) is a parameter group with its own weight_decay (DyDiff's authors)."""
    if cfg.weight_decay_form == "loss":
        return torch.optim.Adam(net.parameters(), lr=cfg.lr)
    groups = [{"params": list(layer.parameters()), "weight_decay": wd}
              for layer, wd in zip(net.layers, cfg.weight_decay)]
    rest = [p for name, p in net.named_parameters() if not name.startswith("layers.")]
    return torch.optim.Adam(groups + ([{"params": rest}] if rest else []), lr=cfg.lr)


@torch.no_grad()
def member_mse(net: EnsembleNet, x: torch.Tensor, y: torch.Tensor,
               chunk: int = 16384) -> torch.Tensor:
    """Per-member MSE of the predicted means on (x, y): (E,)."""
    total = torch.zeros(net.members, device=x.device)
    for lo in range(0, len(x), chunk):
        mean, _ = net(x[lo:lo + chunk])
        total += (mean - y[lo:lo + chunk]).square().sum(dim=(1, 2))
    return total / y.numel()


def dataset_tensors(dataset: Dataset, reward_head: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs [obs, act] (N, o+a) and raw targets [next_obs - obs, reward] (N, o+1; without
    the reward column (N, o) when not reward_head), float32, on the CPU (the trainer moves
    its splits to its device)."""
    as_t = lambda a: torch.as_tensor(a, dtype=torch.float32, device="cpu")  # noqa: E731
    obs, act = as_t(dataset.observations), as_t(dataset.actions)
    nxt, rew = as_t(dataset.next_observations), as_t(dataset.rewards)[:, None]
    targets = [nxt - obs, rew] if reward_head else [nxt - obs]
    return torch.cat([obs, act], 1), torch.cat(targets, 1)


def fit_scales(net: EnsembleNet, inputs: torch.Tensor, train_idx: torch.Tensor, obs_dim: int,
               target_space: str) -> None:
    """Set the input standardiser and the target scale for `target_space` (see EnsembleConfig).
    standardized_obs takes the statistics of every row, as the authors' buffer normalises the
    whole dataset before splitting off the holdout (rlkit/utils/buffer.py:453-483)."""
    if target_space == "raw":
        net.input_norm.fit(inputs[train_idx])
        return
    obs = inputs[:, :obs_dim]
    std = obs.std(0, unbiased=False) + 1e-6   # np.std, + 1e-6 (buffer.py:457,478-483)
    net.input_norm.mean.zero_()
    net.input_norm.std.fill_(1.0)   # actions stay raw
    net.input_norm.mean[:obs_dim] = obs.mean(0)
    net.input_norm.std[:obs_dim] = std
    net.target_scale[:obs_dim] = std   # (next - obs) / std: the standardised states' delta


def split_indices(n: int, cfg: EnsembleConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, holdout) row indices of a permutation seeded by `seed` (MBPO's holdout rule)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed), device="cpu")
    train, hold = holdout_split(perm, cfg.holdout_ratio, cfg.max_holdout)
    if len(hold) < 1 or len(train) < 1:
        raise ValueError(f"dataset of {n} transitions is too small for a holdout split "
                         f"(holdout_ratio {cfg.holdout_ratio} gives {len(hold)} holdout rows)")
    return train, hold


# ---- training ---------------------------------------------------------------------------------

def member_rows(members: int, n_train: int, sampling: str, seed: int) -> torch.Tensor:
    """(members, n_train) indices into the training rows each member trains on: a bootstrap
    sample each (drawn once from `seed`, so a resumed run draws the same; bootstrap_permuted
    applies them to a permutation of the rows each epoch), or all rows."""
    if sampling == "permutation":
        return torch.arange(n_train, device="cpu").expand(members, n_train)
    return torch.randint(n_train, (members, n_train), device="cpu",
                         generator=torch.Generator().manual_seed(seed))


def train_ensemble(dataset: Dataset, cfg: EnsembleConfig | dict, out_dir: str | Path,
                   seed: int = 0, log_fn: Callable[[dict, int], None] | None = None,
                   progress: bool = True, device: torch.device | str | None = None,
                   stop_at: int | None = None) -> dict:
    """Train (or resume) the ensemble on `dataset`; returns a summary dict (also in model.pt).

    Summary: epochs, holdout_mse (per member, of the kept weights: `keep`), elites,
    holdout_mse_elites (mean over elites), holdout_mse_trivial (next = current state, reward =
    training mean), the same two restricted to the state dims (holdout_obs_mse_elites,
    holdout_obs_mse_trivial), train/holdout sizes, wall_time_s. MSEs are in target units
    (`target_space`: raw, or the standardised states' for standardized_obs).
    stop_at: checkpoint after epoch `stop_at` and return early (simulates pre-emption; tests).
    """
    if not isinstance(cfg, EnsembleConfig):
        cfg = from_dict(EnsembleConfig, cfg, where="models.ensemble")
    out_dir, device, _ = start_training(out_dir, seed, device)
    inputs, targets = dataset_tensors(dataset, cfg.reward_head)
    train_idx, hold_idx = split_indices(len(inputs), cfg, seed)
    o = dataset.obs_dim
    net = EnsembleNet(inputs.shape[1], targets.shape[1], cfg)
    fit_scales(net, inputs, train_idx, o, cfg.target_space)
    targets = targets / net.target_scale  # training, holdout MSE and stopping in target units
    net.to(device)
    opt = make_optimizer(net, cfg)
    x_train, y_train = inputs[train_idx].to(device), targets[train_idx].to(device)
    x_hold, y_hold = inputs[hold_idx].to(device), targets[hold_idx].to(device)
    order_gen = torch.Generator().manual_seed(seed + 1)  # per-member batch orders
    E, n_train = cfg.num_members, len(train_idx)
    rows = member_rows(E, n_train, cfg.sampling, seed + 2).to(device)

    since_update, finished = 0, False
    best = torch.full((E,), float("inf"), device="cpu")  # compared with the CPU copy of mse
    # keep best: every member's weights at its best holdout epoch (keep last needs none)
    snapshot = ({k: p.detach().clone() for k, p in net.member_parameters().items()}
                if cfg.keep == "best" else {})
    expect = {"config": dataclasses.asdict(cfg), "seed": seed, "n": len(inputs)}
    # Its only generator is a CPU one (batch orders): the checkpoint resumes on any device.
    ckpt = Checkpointer(out_dir / CHECKPOINT, expect, every=cfg.checkpoint_every,
                        columns=METRIC_COLUMNS, unit="epoch", device=device, portable=True)
    if ckpt.resumed:
        net.load_state_dict(ckpt.state["model"])
        opt.load_state_dict(ckpt.state["optimizer"])
        order_gen.set_state(ckpt.state["order_gen"])
        since_update, finished = ckpt.state["since_update"], ckpt.state["finished"]
        best = ckpt.state["best"].clone()
        snapshot = {k: v.to(device) for k, v in ckpt.state["snapshot"].items()}
    epoch = ckpt.start

    def state() -> dict:
        return {"model": net.state_dict(), "optimizer": opt.state_dict(),
                "order_gen": order_gen.get_state(), "since_update": since_update,
                "finished": finished, "best": best, "snapshot": snapshot}

    bar = tqdm(total=cfg.max_epochs, initial=epoch, disable=not progress, desc="ensemble",
               dynamic_ncols=True)
    while not finished:
        net.train()
        if cfg.sampling == "bootstrap_permuted":
            # The fixed bootstrap positions index a fresh permutation of the training rows.
            order = torch.randperm(n_train, generator=order_gen, device="cpu").to(device)[rows]
        else:  # every member's rows in a fresh order of its own: (E, n_train)
            shuffle = torch.argsort(torch.rand(E, n_train, generator=order_gen, device="cpu"),
                                    dim=1).to(device)
            order = rows.gather(1, shuffle)
        losses = []
        for lo in range(0, n_train, cfg.batch_size):
            idx = order[:, lo:lo + cfg.batch_size]
            loss = ensemble_loss(net, x_train[idx], y_train[idx], cfg.logvar_loss_coef)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        epoch += 1
        mse = member_mse(net, x_hold, y_hold).cpu()
        improved = mse < best * (1.0 - cfg.min_improvement)
        if improved.any():
            keep = improved.to(device)
            params = net.member_parameters()
            with torch.no_grad():
                for k, p in snapshot.items():
                    p[keep] = params[k].detach()[keep]
            best = torch.where(improved, mse, best)
            since_update = 0
        else:
            since_update += 1
        finished = since_update >= cfg.patience or (
            cfg.max_epochs is not None and epoch >= cfg.max_epochs)
        row = ckpt.log({"epoch": epoch, "train_loss": torch.stack(losses).mean().item(),
                        "holdout_mse": mse.mean().item(),
                        "holdout_mse_elites": mse.sort().values[:cfg.num_elites].mean().item()})
        bar.update(1)
        if epoch % cfg.log_every == 0 or finished:
            bar.set_postfix(holdout=f"{row['holdout_mse_elites']:.4g}", stale=since_update)
            if log_fn is not None:
                log_fn({f"ensemble_{k}": v for k, v in row.items() if k != "epoch"}, epoch)
        if ckpt.maybe_save(epoch, finished, state, stop_at):
            bar.close()
            return {"epochs": epoch, "interrupted": True}
    bar.close()

    # The final model: every member at its best holdout epoch (keep best) or as trained.
    if cfg.keep == "best":
        with torch.no_grad():
            for k, p in net.member_parameters().items():
                p.copy_(snapshot[k])
    net.eval()
    mse = member_mse(net, x_hold, y_hold).cpu()
    elites = sorted(mse.argsort()[:cfg.num_elites].tolist())
    trivial = torch.zeros_like(y_hold)
    if cfg.reward_head:
        trivial[:, o] = y_train[:, o].mean()  # next = current state, reward = training mean
    with torch.no_grad():  # state dims only: the error of the predicted next state
        mean, _ = net(x_hold)
        obs_mse = (mean[..., :o] - y_hold[:, :o]).square().mean(dim=(1, 2)).cpu()
    summary = {
        "epochs": epoch, "n_train": n_train, "n_holdout": len(hold_idx),
        "holdout_mse": mse.tolist(), "elites": elites,
        "holdout_mse_elites": float(mse[elites].mean()),
        "holdout_mse_trivial": float((trivial - y_hold).square().mean()),
        "holdout_obs_mse_elites": float(obs_mse[elites].mean()),
        "holdout_obs_mse_trivial": float(y_hold[:, :o].square().mean()),
        "wall_time_s": ckpt.rows[-1]["wall_time_s"] if ckpt.rows else 0.0}
    save_checkpoint(out_dir / MODEL, {
        "model": net.state_dict(), "config": dataclasses.asdict(cfg), "elites": elites,
        "obs_dim": o, "act_dim": dataset.act_dim, "name": dataset.name, "summary": summary})
    return summary


# ---- the trained model ------------------------------------------------------------------------

class EnsembleDynamics:
    """A trained ensemble as a dynamics model (rollout generators, rollout-error study).

    predict(obs, act) -> (mean, std) each (E, N, o+1): next state (obs included) and reward
                         in raw units ((E, N, o) without a reward head).
    step(...)        -> MBPO-style sample: one random elite per sample, Gaussian draw from it.
    open_loop / policy_rollout use the mean over the elites' means: deterministic, so the
    rollout-error study measures model bias rather than sampling noise.
    A model without a reward head (models.<name>.reward_head false) predicts states only:
    asking it for rewards (step, open_loop with_rewards) is a ValueError.
    """

    def __init__(self, net: EnsembleNet, elites: list[int], obs_dim: int, act_dim: int,
                 name: str, device: torch.device | str = "cpu", chunk: int = 16384):
        self.net = net.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.elites = torch.as_tensor(elites, dtype=torch.long, device=self.device)
        self.obs_dim, self.act_dim, self.name = obs_dim, act_dim, name
        self.num_members = net.members
        self.has_rewards = net.out_dim == obs_dim + 1
        self.chunk = chunk  # samples per network call (bounds (E, chunk, 200) activations)

    def _need_rewards(self, what: str) -> None:
        if not self.has_rewards:
            raise ValueError(f"ensemble {self.name!r} has no reward head (trained with "
                             f"reward_head false): {what} needs rewards; use a model trained "
                             f"with reward_head true (models.ensemble)")

    def _inputs(self, obs, act) -> tuple[torch.Tensor, torch.Tensor]:
        obs = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        act = torch.as_tensor(act, dtype=torch.float32, device=self.device)
        if obs.shape[-1] != self.obs_dim or act.shape[-1] != self.act_dim:
            raise ValueError(f"ensemble {self.name!r} takes obs/act dims {self.obs_dim}/"
                             f"{self.act_dim}, got {obs.shape[-1]}/{act.shape[-1]}")
        return obs, act

    @torch.no_grad()
    def predict(self, obs, act) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, o), (N, a) -> mean, std each (E, N, o+1) in raw units: [next_obs, reward]
        ((E, N, o) without a reward head)."""
        obs, act = self._inputs(obs, act)
        if len(obs) == 0:
            empty = torch.zeros(self.num_members, 0, self.net.out_dim, device=self.device)
            return empty, empty.clone()
        scale = self.net.target_scale  # target units -> raw units
        means, stds = [], []
        for lo in range(0, len(obs), self.chunk):
            o_, a_ = obs[lo:lo + self.chunk], act[lo:lo + self.chunk]
            mean, logvar = self.net(torch.cat([o_, a_], -1))
            mean = mean * scale
            mean = torch.cat([mean[..., :self.obs_dim] + o_, mean[..., self.obs_dim:]], -1)
            means.append(mean)
            stds.append(torch.exp(0.5 * logvar) * scale)
        return torch.cat(means, 1), torch.cat(stds, 1)

    @torch.no_grad()
    def step(self, obs, act, generator: torch.Generator | None = None,
             deterministic: bool = False) -> dict[str, torch.Tensor]:
        """One model step for N samples: each sample uses one uniformly drawn elite member and
        (unless deterministic) a Gaussian draw from it. Returns next_obs (N, o), rewards (N,),
        and every member's means / stds (E, N, o+1) for uncertainty penalties."""
        self._need_rewards("step (MOPO / MBPO rollouts)")
        means, stds = self.predict(obs, act)
        pick, rows = self._random_elites(means.shape[1], generator)
        out = means[pick, rows]
        if not deterministic:
            noise = torch.randn(out.shape, generator=generator, device=self.device)
            out = out + stds[pick, rows] * noise
        return {"next_obs": out[:, :self.obs_dim], "rewards": out[:, self.obs_dim],
                "means": means, "stds": stds}

    def _random_elites(self, n: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(member, row) indices of one uniformly drawn elite per sample."""
        pick = self.elites[torch.randint(len(self.elites), (n,), generator=generator,
                                         device=self.device)]
        return pick, torch.arange(n, device=self.device)

    @torch.no_grad()
    def elite_step(self, obs, act, generator: torch.Generator | None = None) -> torch.Tensor:
        """Next states (N, o): the mean of one elite drawn uniformly per sample (no Gaussian
        draw), the DyDiff authors' start-trajectory step (`deterministic=True`,
        rlkit/dynamics_model_trainer.py:212-215)."""
        means, _ = self.predict(obs, act)
        pick, rows = self._random_elites(means.shape[1], generator)
        return means[pick, rows][:, :self.obs_dim]

    @torch.no_grad()
    def mean_step(self, obs, act) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Deterministic step: mean over the elites' means -> next_obs (N, o), rewards (N,)
        (None without a reward head)."""
        means, _ = self.predict(obs, act)
        m = means[self.elites].mean(0)
        return m[:, :self.obs_dim], (m[:, self.obs_dim] if self.has_rewards else None)

    @torch.no_grad()
    def open_loop(self, start_obs, actions, with_rewards: bool = False):
        """States after each given action, (N, o), (N, H, a) -> (N, H, o), autoregressive on
        the elite-mean prediction (deterministic). with_rewards: dict(next_obs, rewards)."""
        if with_rewards:
            self._need_rewards("open_loop(with_rewards=True)")
        obs, actions = self._inputs(start_obs, actions)
        nxt, rew = [], []
        for t in range(actions.shape[1]):  # sequential in time; batched over the N starts
            obs, r = self.mean_step(obs, actions[:, t])
            nxt.append(obs)
            rew.append(r)
        next_obs = torch.stack(nxt, 1)
        return {"next_obs": next_obs, "rewards": torch.stack(rew, 1)} if with_rewards \
            else next_obs

    @torch.no_grad()
    def policy_rollout(self, start_obs, agent, H: int) -> dict[str, torch.Tensor]:
        """H steps of agent.act(obs, deterministic=True) on the elite-mean model:
        dict(obs, actions, next_obs, rewards) each (N, H, .) (rewards (N, H); no rewards
        without a reward head)."""
        obs = torch.as_tensor(start_obs, dtype=torch.float32, device=self.device)
        out = {k: [] for k in ("obs", "actions", "next_obs", "rewards")}
        for _ in range(H):
            act = torch.as_tensor(agent.act(obs, deterministic=True), dtype=torch.float32,
                                  device=self.device)
            nxt, r = self.mean_step(obs, act)
            for k, v in zip(out, (obs, act, nxt, r)):
                out[k].append(v)
            obs = nxt
        return {k: torch.stack(v, 1) for k, v in out.items() if v[0] is not None}


def load_ensemble(out_dir: str | Path, device: torch.device | str = "cpu") -> EnsembleDynamics:
    """The trained ensemble in out_dir/model.pt (written by `train_ensemble`)."""
    path = Path(out_dir) / MODEL
    state = load_checkpoint(path)
    if state is None:
        raise FileNotFoundError(f"no ensemble model at {path} (run `dydiff-bench train-model "
                                "--model ensemble` first; DyDiff's: --model ensemble-dydiff)")
    cfg = from_dict(EnsembleConfig, state["config"], where=f"{path}:config")
    o, a = state["obs_dim"], state["act_dim"]
    net = EnsembleNet(o + a, target_dim(cfg, o), cfg)
    # Models saved before target_scale existed were trained in raw units: scale 1.
    net.load_state_dict({"target_scale": net.target_scale, **state["model"]})
    return EnsembleDynamics(net, state["elites"], o, a, state["name"], device)


__all__ = ["EnsembleConfig", "DyDiffEnsembleConfig", "EnsembleLinear", "EnsembleNet",
           "EnsembleDynamics", "train_ensemble", "load_ensemble", "split_indices", "nll_loss",
           "ensemble_loss", "make_optimizer", "target_dim"]
