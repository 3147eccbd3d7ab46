"""Conservative Q-Learning (Kumar et al. 2020), CQL(H) on top of SAC; OfflineRL-Kit's defaults.

Each critic's loss adds the conservative term
    w * ( T * E_s[ log sum_a exp(Q(s, a) / T) ] - E_(s,a)~D[ Q(s, a) ] )
where the log-sum-exp over actions is estimated by importance sampling with N actions from
each of: Uniform(-1, 1)^d, pi(.|s) and pi(.|s') (all evaluated at s), each Q corrected by the
log-density of its proposal. With the Lagrange variant the weight becomes a learned
alpha' >= 0 that pushes the (weighted) gap towards `lagrange_threshold`.

Per update the actor runs once, without grad, on [s; s'] for every action it proposes there
(the TD target's at s', the N proposals at s and at s': one forward per state, the N draws
from its output); one critic call covers the data actions and all 3N proposals.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness.config import require
from harness.nets import Standardizer
from agents.sac import SAC, SACConfig, adam, as_floats, fit_obs_stats

Dist = tuple[torch.Tensor, torch.Tensor]  # (mu, log_std) of the actor's pre-tanh Gaussian


@dataclass
class CQLConfig(SACConfig):
    hidden: list[int] = field(default_factory=lambda: [256, 256, 256])  # OfflineRL-Kit / CORL
    alpha: float = 1.0              # initial SAC temperature (log_alpha starts at 0)
    cql_weight: float = 5.0         # min-Q weight w
    temperature: float = 1.0        # T
    num_repeat_actions: int = 10    # N actions per proposal
    deterministic_backup: bool = True  # no entropy bonus in the TD target
    with_lagrange: bool = False
    lagrange_threshold: float = 10.0
    cql_alpha_lr: float = 3e-4
    # Initial log(alpha') of the Lagrange variant. 0 (alpha' = 1): ours, OfflineRL-Kit
    # (offlinerlkit/policy/model_free/cql.py:57), the DyDiff authors (rlkit/algo/cql.py:83).
    # CORL: 1.0, alpha' = e (algorithms/offline/cql.py:513, Scalar(1.0)).
    cql_log_alpha_init: float = 0.0
    max_action: float = 1.0
    # Learning rates: the DyDiff authors use policy_lr 3e-5 (actor_lr), qf_lr 3e-4 (critic_lr),
    # and their temperature optimiser reuses policy_lr, so set alpha_lr = actor_lr = 3e-5
    # (rlkit/algo/cql.py:57-71; exp_specs/cql/cql_hopper_me.yaml). CORL: policy_lr 3e-5, qf_lr
    # 3e-4, alpha optimiser on policy_lr too (algorithms/offline/cql.py:43-44,504-509).
    # Standardise observations, (o - mean) / (std + obs_std_eps), with the real dataset's
    # mean/population std fitted in `from_dataset` and kept as buffers (saved with the policy).
    # Authors: true with eps 1e-6 (rlkit/utils/buffer.py:453-483,
    # run_scripts/dydiff_cql_script.py:92-101). CORL: true with eps 1e-3
    # (algorithms/offline/cql.py:57,853-864). Ours (OfflineRL-Kit): false.
    normalize_obs: bool = False
    obs_std_eps: float = 1e-3
    # Clamp log(alpha) to [lo, hi] for the temperature the actor loss uses (and the entropy
    # backup, if on); the temperature's own loss uses the unclamped log(alpha). Authors:
    # [-10.0, 0.5] (rlkit/algo/cql.py:11-12,123,132). CORL and ours: no clamp.
    log_alpha_clamp: list[float] | None = None
    # Update order. false (ours, CORL: algorithms/offline/cql.py:750-778, where the actor loss
    # uses alpha before its step): actor with the current alpha, then alpha. true (authors:
    # rlkit/algo/cql.py:116-135): alpha first, then the actor loss with the updated (clamped)
    # alpha, on the same action sample.
    alpha_before_actor: bool = False
    # CORL's order (algorithms/offline/cql.py:750-787): every loss (temperature, actor, critics)
    # at the pre-update parameters, then the steps: alpha, actor, critics. false: the critic
    # loss uses the actor after its step (OfflineRL-Kit: offlinerlkit/policy/model_free/cql.py:92-190).
    losses_before_steps: bool = False
    # The log-sum-exp over proposal actions. true (ours, OfflineRL-Kit, CORL's
    # cql_importance_sample): each Q minus its proposal's log-density, 3N terms. false (CORL's
    # other branch, cql.py:626-643): raw Qs of the 3N proposals plus Q(s, a_data).
    importance_sample: bool = True
    # TD target from the max over N policy actions at s' of min(Q1', Q2') (CORL
    # cql_max_target_backup, cql.py:568-581; OfflineRL-Kit max_q_backup). Both default false.
    max_target_backup: bool = False
    # Rewards times 1000 / (max - min episode return of the dataset), CORL's `modify_reward`
    # (cql.py:223-249; its configs turn it on for hopper-medium only). Ours: false.
    normalize_reward: bool = False

    def validate(self) -> None:
        super().validate()
        require(not (self.losses_before_steps and self.alpha_before_actor), "losses_before_steps",
                "cannot be combined with alpha_before_actor (two different update orders)")
        require(self.obs_std_eps >= 0, "obs_std_eps", f"must be >= 0, got {self.obs_std_eps}")
        if self.log_alpha_clamp is not None:
            require(len(self.log_alpha_clamp) == 2
                    and self.log_alpha_clamp[0] <= self.log_alpha_clamp[1], "log_alpha_clamp",
                    f"must be [lo, hi] with lo <= hi, got {self.log_alpha_clamp}")
        require(self.cql_weight >= 0, "cql_weight", f"must be >= 0, got {self.cql_weight}")
        require(self.temperature > 0, "temperature", f"must be positive, got {self.temperature}")
        require(self.num_repeat_actions >= 1, "num_repeat_actions",
                f"must be >= 1, got {self.num_repeat_actions}")


def return_range(rewards, terminals, timeouts, max_episode_steps: int = 1000
                 ) -> tuple[float, float]:
    """(min, max) episode return as CORL computes it for `modify_reward`
    (algorithms/offline/cql.py:223-235) on d4rl.qlearning_dataset's output: the time-limit rows
    are dropped first, then an episode ends at a terminal or after `max_episode_steps` rows."""
    keep = ~np.asarray(timeouts, dtype=bool)
    returns, ret, length = [], 0.0, 0
    for r, d in zip(np.asarray(rewards, dtype=np.float64)[keep], np.asarray(terminals)[keep]):
        ret, length = ret + float(r), length + 1
        if d or length == max_episode_steps:
            returns.append(ret)
            ret, length = 0.0, 0
    if not returns:
        raise ValueError("normalize_reward: the dataset has no complete episode")
    return min(returns), max(returns)


class CQL(SAC):
    def __init__(self, obs_dim: int, act_dim: int, cfg: CQLConfig | None = None):
        cfg = cfg or CQLConfig()
        super().__init__(obs_dim, act_dim, cfg)
        self.cfg: CQLConfig = cfg
        self.cql_log_alpha = nn.Parameter(torch.tensor(float(cfg.cql_log_alpha_init)))
        self.cql_alpha_opt = adam([self.cql_log_alpha], cfg.cql_alpha_lr)
        # Only with normalize_obs, so the default agent's state_dict keeps its keys.
        self.normalizer = (Standardizer(obs_dim, eps=cfg.obs_std_eps) if cfg.normalize_obs
                           else None)
        if cfg.normalize_reward:  # a buffer, saved with the policy; only then (same keys)
            self.register_buffer("reward_scale", torch.ones(()))

    @classmethod
    def from_dataset(cls, dataset, cfg: CQLConfig | None = None) -> "CQL":
        agent = cls(dataset.obs_dim, dataset.act_dim, cfg)
        agent.set_obs_stats(dataset.observations)
        if agent.cfg.normalize_reward:
            lo, hi = return_range(dataset.rewards, dataset.terminals, dataset.timeouts)
            agent.reward_scale.fill_(1000.0 / (hi - lo))
        return agent

    def set_obs_stats(self, observations) -> None:
        """Fix the observation standardisation to the real dataset's statistics (if enabled)."""
        if self.normalizer is not None:
            fit_obs_stats(self.normalizer, observations, self.cfg.obs_std_eps)

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        return obs if self.normalizer is None else self.normalizer(obs)

    @property
    def policy_alpha(self) -> torch.Tensor:
        if self.cfg.log_alpha_clamp is None:
            return self.alpha
        lo, hi = self.cfg.log_alpha_clamp
        return self.log_alpha.detach().clamp(lo, hi).exp()

    @torch.no_grad()
    def act(self, obs: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        """Action for raw observations (standardised inside when `normalize_obs`)."""
        return self.actor(self.normalize(obs), deterministic)[0]

    def td_target(self, batch: dict[str, torch.Tensor], next_dist: Dist | None = None
                  ) -> torch.Tensor:
        """r + gamma (1 - d) V(s'); `next_dist` is the actor's output at s' if already known."""
        with torch.no_grad():
            next_obs = batch["next_obs"]
            mu, log_std = self.actor.dist(next_obs) if next_dist is None else next_dist
            if self.cfg.max_target_backup:
                b, n = len(next_obs), self.cfg.num_repeat_actions
                next_rep = next_obs.repeat_interleave(n, 0)
                next_act, next_logp = self.actor.sample(mu.repeat_interleave(n, 0),
                                                        log_std.repeat_interleave(n, 0))
                q = self.critic_target(next_rep, next_act).min(0).values.reshape(b, n)
                next_q, best = q.max(1)
                next_logp = next_logp.reshape(b, n).gather(1, best[:, None]).squeeze(1)
            else:
                next_act, next_logp = self.actor.sample(mu, log_std)
                next_q = self.critic_target(next_obs, next_act).min(0).values
            if not self.cfg.deterministic_backup:
                next_q = next_q - self.policy_alpha * next_logp
            return batch["rewards"] + self.cfg.gamma * (1 - batch["terminals"]) * next_q

    @torch.no_grad()
    def sample_cql_actions(self, obs: torch.Tensor, next_obs: torch.Tensor,
                           dists: tuple[Dist, Dist] | None = None) -> dict[str, torch.Tensor]:
        """N actions per state from each proposal, flattened to (B*N, .), with log-densities.
        `dists`: the actor's output at obs and at next_obs, if already known."""
        n, a, m = self.cfg.num_repeat_actions, self.act_dim, self.cfg.max_action
        if dists is None:
            dists = self.actor_dists(obs, next_obs)
        (mu, log_std), (next_mu, next_log_std) = dists
        rep = lambda t: t.repeat_interleave(n, 0)  # noqa: E731  (state i's rows: i*N .. i*N+N-1)
        rand = (torch.rand(len(obs) * n, a, device=obs.device) * 2 - 1) * m
        pi, logp_pi = self.actor.sample(rep(mu), rep(log_std))
        next_pi, logp_next_pi = self.actor.sample(rep(next_mu), rep(next_log_std))
        logp_rand = torch.full_like(logp_pi, -a * math.log(2 * m))  # Uniform(-m, m)^a
        return {"obs_rep": rep(obs), "rand": rand, "logp_rand": logp_rand, "pi": pi,
                "logp_pi": logp_pi, "next_pi": next_pi, "logp_next_pi": logp_next_pi}

    def actor_dists(self, obs: torch.Tensor, next_obs: torch.Tensor) -> tuple[Dist, Dist]:
        """The actor's output at obs and at next_obs from one forward on [obs; next_obs]."""
        mu, log_std = self.actor.dist(torch.cat([obs, next_obs]))
        b = len(obs)
        return (mu[:b], log_std[:b]), (mu[b:], log_std[b:])

    @staticmethod
    def proposals(samples: dict[str, torch.Tensor]) -> torch.Tensor:
        """Critic inputs [s, a] of the 3N proposals, ordered (proposal, state, repeat)."""
        acts = torch.cat([samples["rand"], samples["pi"], samples["next_pi"]])
        return torch.cat([samples["obs_rep"].repeat(3, 1), acts], -1)

    def conservative_gap(self, q_data: torch.Tensor, samples: dict[str, torch.Tensor],
                         q_is: torch.Tensor | None = None) -> torch.Tensor:
        """Per critic (2,): T * mean_s logsumexp_a(Q_IS / T) - mean Q(s, a_data). `q_is`:
        the critics at `proposals(samples)`, (2, 3*B*N), computed here if None."""
        b, n = q_data.shape[1], self.cfg.num_repeat_actions
        if q_is is None:
            q_is = self.critic.net(self.proposals(samples)).squeeze(-1)     # (2, 3*B*N)
        if self.cfg.importance_sample:  # each Q minus its proposal's log-density
            q_is = q_is - torch.cat([samples["logp_rand"], samples["logp_pi"],
                                     samples["logp_next_pi"]])
        q_is = q_is.reshape(-1, 3, b, n).permute(0, 2, 1, 3).reshape(-1, b, 3 * n)
        if not self.cfg.importance_sample:  # CORL's plain branch also counts Q(s, a_data)
            q_is = torch.cat([q_is, q_data[..., None]], -1)
        t = self.cfg.temperature
        return t * torch.logsumexp(q_is / t, dim=-1).mean(-1) - q_data.mean(-1)

    def update_alpha(self, logp: torch.Tensor) -> None:
        if self.cfg.auto_alpha:
            alpha_loss = -(self.log_alpha * (logp.detach() + self.target_entropy)).mean()
            self.alpha_opt.zero_grad(set_to_none=True)
            alpha_loss.backward()
            self.alpha_opt.step()

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One step on a batch of raw observations."""
        self.start_update()
        if self.normalizer is not None:
            batch = {**batch, "obs": self.normalizer(batch["obs"]),
                     "next_obs": self.normalizer(batch["next_obs"])}
        if self.cfg.normalize_reward:
            batch = {**batch, "rewards": batch["rewards"] * self.reward_scale}
        # Actor and temperature first, then critics (OfflineRL-Kit's order).
        sample = self.actor(batch["obs"])
        if self.cfg.alpha_before_actor:  # the authors': alpha steps, then the actor uses it
            self.update_alpha(sample[1])
        policy_alpha = self.policy_alpha
        aloss, logp = self.actor_loss(batch["obs"], sample)
        if self.cfg.losses_before_steps:  # CORL: the critic loss before any step
            closs, info = self.critic_loss(batch)
            self.update_alpha(logp)
        self.actor_opt.zero_grad(set_to_none=True)
        aloss.backward()
        self.actor_opt.step()
        if not self.cfg.losses_before_steps:
            if not self.cfg.alpha_before_actor:
                self.update_alpha(logp)
            closs, info = self.critic_loss(batch)
        self.critic_opt.zero_grad(set_to_none=True)
        closs.backward()
        self.critic_opt.step()
        self.soft_update()
        info.update(actor_loss=aloss.detach(), alpha=self.alpha)
        if self.cfg.log_alpha_clamp is not None:
            info["policy_alpha"] = policy_alpha
        return as_floats(info)

    def critic_loss(self, batch: dict[str, torch.Tensor]
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """TD + conservative loss of both critics (a Lagrange step on alpha' included), and
        the logged scalars as 0-d tensors."""
        obs, b = batch["obs"], len(batch["obs"])
        with torch.no_grad():  # the TD target's draw first, then the proposals' (RNG order)
            at_obs, at_next = self.actor_dists(obs, batch["next_obs"])
            target = self.td_target(batch, at_next)
            samples = self.sample_cql_actions(obs, batch["next_obs"], (at_obs, at_next))
        q_all = self.critic.net(torch.cat([torch.cat([obs, batch["actions"]], -1),
                                           self.proposals(samples)])).squeeze(-1)  # (2, B+3BN)
        q, q_is = q_all[:, :b], q_all[:, b:]
        td_loss = F.mse_loss(q, target.expand_as(q), reduction="none").mean(1)
        penalty = self.cfg.cql_weight * self.conservative_gap(q, samples, q_is)  # (2,)
        info = {}
        if self.cfg.with_lagrange:
            cql_alpha = self.cql_log_alpha.exp().clamp(0.0, 1e6)
            # alpha' rises while the weighted gap exceeds the threshold (dual ascent).
            cql_alpha_loss = -(cql_alpha * (penalty.detach() - self.cfg.lagrange_threshold)
                               ).mean()
            self.cql_alpha_opt.zero_grad(set_to_none=True)
            cql_alpha_loss.backward()
            self.cql_alpha_opt.step()
            penalty = cql_alpha.detach() * (penalty - self.cfg.lagrange_threshold)
            info["cql_alpha"] = cql_alpha.detach()
        info.update(critic_loss=td_loss.detach().sum(), cql_loss=penalty.detach().sum(),
                    q_mean=q.detach().mean())
        return (td_loss + penalty).sum(), info

    def training_state(self) -> dict:
        return {**super().training_state(), "cql_alpha_opt": self.cql_alpha_opt.state_dict()}

    def load_training_state(self, state: dict) -> None:
        super().load_training_state(state)
        self.cql_alpha_opt.load_state_dict(state["cql_alpha_opt"])
