"""Buffers, the shared offline loop (real/model mixing, exact resume), evaluation, train_policy."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from harness.config import ConfigError, from_dict
from harness.training.buffers import RealBuffer, RingBuffer
from agents.cql import CQL, CQLConfig
from harness.training.evaluation import evaluate
from harness.training.offline_loop import OfflineConfig, eval_seed, offline_loop
from agents.sac import SAC, SACConfig
from agents.td3bc import TD3BC, TD3BCConfig
from harness.training.policy import PolicyConfig, load_policy, train_policy

TINY = [32, 32]


class NoisyGenerator:
    """Test rollout generator: H noisy steps of the agent's own policy from the start states.

    Uses the global torch RNG (as the real generators' samplers do), marks every model
    transition with reward 1 so batches can be told apart from the (reward-0) real ones.
    """

    def __init__(self, horizon=3, rollout_batch_size=20):
        self.horizon, self.rollout_batch_size = horizon, rollout_batch_size
        self.max_transitions_per_call = horizon * rollout_batch_size
        self.calls = 0

    def generate(self, agent, start_obs):
        self.calls += 1
        obs, out = start_obs, []
        for _ in range(self.horizon):
            act = agent.act(obs, deterministic=False)
            nxt = obs + 0.01 * torch.randn_like(obs)
            out.append((obs, act, nxt))
            obs = nxt
        o, a, n = (torch.cat(x) for x in zip(*out))
        return {"obs": o, "actions": a, "rewards": torch.ones(len(o)), "next_obs": n,
                "terminals": torch.zeros(len(o)), "mean_penalty": torch.tensor(0.5)}


def real_zero(ds):
    ds.rewards[:] = 0.0
    return ds


def cfg(**kw):
    base = dict(total_steps=24, batch_size=32, rollout_freq=10,
                model_retain_epochs=2, eval_every=12, eval_episodes=2, log_every=4,
                checkpoint_every=100)
    base.update(kw)
    return from_dict(OfflineConfig, base, where="offline")


# --- buffers ---------------------------------------------------------------------------------

def test_ring_buffer_is_fifo_and_keeps_newest_rows():
    buf = RingBuffer(5, obs_dim=2, act_dim=1, seed=0)

    def rows(lo, hi):
        v = torch.arange(lo, hi, dtype=torch.float32)
        return {"obs": v[:, None].expand(-1, 2), "actions": v[:, None], "rewards": v,
                "next_obs": v[:, None].expand(-1, 2), "terminals": torch.zeros(hi - lo)}
    buf.add(rows(0, 3))
    assert len(buf) == 3 and sorted(buf.data["rewards"][:3].tolist()) == [0, 1, 2]
    buf.add(rows(3, 7))       # overwrites the two oldest (0, 1)
    assert len(buf) == 5 and sorted(buf.data["rewards"].tolist()) == [2, 3, 4, 5, 6]
    buf.add(rows(10, 18))     # larger than the buffer: keeps the newest 5
    assert sorted(buf.data["rewards"].tolist()) == [13, 14, 15, 16, 17]
    s = buf.sample(100)
    assert set(s["rewards"].tolist()) <= {13, 14, 15, 16, 17}
    assert torch.equal(s["obs"][:, 0], s["rewards"])  # rows stay aligned across keys
    with pytest.raises(KeyError, match="terminals"):
        buf.add({k: v for k, v in rows(0, 2).items() if k != "terminals"})


def test_buffers_sample_reproducibly_and_restore_their_stream(hopper_random):
    a, b = RealBuffer(hopper_random, seed=3), RealBuffer(hopper_random, seed=3)
    assert torch.equal(a.sample(16)["obs"], b.sample(16)["obs"])
    state = a.state_dict()
    first = a.sample(16)["actions"]
    a.load_state_dict(state)
    assert torch.equal(a.sample(16)["actions"], first)
    ring = RingBuffer(50, hopper_random.obs_dim, hopper_random.act_dim, seed=1)
    ring.add(a.sample(30))
    st = ring.state_dict()
    fresh = RingBuffer(50, hopper_random.obs_dim, hopper_random.act_dim, seed=99)
    fresh.load_state_dict(st)
    assert torch.equal(ring.sample(8)["obs"], fresh.sample(8)["obs"]) and fresh.ptr == 30


# --- the loop --------------------------------------------------------------------------------

class RecordingTD3BC(TD3BC):
    def update(self, batch):
        self.seen = getattr(self, "seen", []) + [batch["rewards"].clone()]
        return super().update(batch)


def test_loop_mixes_real_and_model_transitions_in_ratio(hopper_random, tmp_path):
    ds = real_zero(hopper_random.subset(np.arange(len(hopper_random))))
    agent = RecordingTD3BC.from_dataset(ds, TD3BCConfig(hidden=TINY))
    gen = NoisyGenerator(horizon=3)
    c = cfg(real_ratio=0.25, total_steps=21, eval_every=1000)
    df = offline_loop(agent, ds, c, tmp_path, seed=0, generator=gen, progress=False)
    assert gen.calls == 3                       # steps 1, 11, 21
    fractions = [float((r == 1).float().mean()) for r in agent.seen]
    assert all(f == pytest.approx(24 / 32) for f in fractions)  # 8 real + 24 model
    assert "rollout_mean_penalty" in df and df["rollout_mean_penalty"].dropna().eq(0.5).all()
    assert df["normalized_score"].notna().sum() == 1  # final evaluation only


def test_model_buffer_size_bounds_the_model_buffer(hopper_random, tmp_path, monkeypatch):
    """model_buffer_size (DyDiff's 2e6 transitions) overrides retain_epochs x per-call."""
    from harness.training import offline_loop as loop
    sizes = []
    real_ring = loop.RingBuffer
    monkeypatch.setattr(loop, "RingBuffer", lambda n, *a, **k: sizes.append(n) or
                        real_ring(n, *a, **k))
    agent = TD3BC.from_dataset(hopper_random, TD3BCConfig(hidden=TINY))
    for extra in ({}, {"model_buffer_size": 45}):
        offline_loop(agent, hopper_random, cfg(real_ratio=0.5, total_steps=2, **extra),
                     tmp_path / str(len(sizes)), seed=0, generator=NoisyGenerator(),
                     progress=False)
    assert sizes == [2 * 3 * 20, 45]  # model_retain_epochs x horizon x rollout_batch_size


def run_td3bc(ds, out, gen=None, stop_at=None, **kw):
    torch.manual_seed(0)
    agent = TD3BC.from_dataset(ds, TD3BCConfig(hidden=TINY))
    df = offline_loop(agent, ds, cfg(**kw), out, seed=7, generator=gen, progress=False,
                      stop_at=stop_at)
    return agent, df


def same_run(df_a, df_b, agent_a, agent_b):
    cols = [c for c in df_a.columns if c != "wall_time_s"]
    pd.testing.assert_frame_equal(df_a[cols], df_b[cols])
    assert all(torch.equal(p, q) for p, q in zip(agent_a.state_dict().values(),
                                                  agent_b.state_dict().values()))


def test_interrupted_and_resumed_run_equals_uninterrupted_model_based(hopper_random, tmp_path):
    full_agent, full = run_td3bc(hopper_random, tmp_path / "full", NoisyGenerator(),
                                 real_ratio=0.5)
    _, part = run_td3bc(hopper_random, tmp_path / "cut", NoisyGenerator(), stop_at=13,
                        real_ratio=0.5)
    assert part["step"].max() == 12 and (tmp_path / "cut" / "checkpoint.pt").exists()
    torch.manual_seed(123)  # a fresh agent whose own init differs must not matter
    resumed_agent = TD3BC(hopper_random.obs_dim, hopper_random.act_dim, TD3BCConfig(hidden=TINY))
    gen = NoisyGenerator()
    resumed = offline_loop(resumed_agent, hopper_random, cfg(real_ratio=0.5), tmp_path / "cut",
                           seed=7, generator=gen, progress=False)
    same_run(full, resumed, full_agent, resumed_agent)
    on_disk = pd.read_parquet(tmp_path / "cut" / "metrics.parquet")
    assert len(on_disk) == len(full) and full["normalized_score"].notna().sum() == 2
    assert (on_disk["wall_time_s"].diff().dropna() >= 0).all()


def test_resume_in_a_fresh_process_equals_uninterrupted_cql(hopper_random, tmp_path):
    script = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        from datagen.generate import random_dataset
        from agents.cql import CQL, CQLConfig
        from harness.training.offline_loop import OfflineConfig, eval_seed, offline_loop
        ds = random_dataset("hopper", 3000, seed=0)
        torch.manual_seed(0)
        agent = CQL(ds.obs_dim, ds.act_dim, CQLConfig(hidden={TINY}))
        c = OfflineConfig(total_steps=16, batch_size=32, eval_every=8, eval_episodes=2,
                          log_every=4, checkpoint_every=100)
        offline_loop(agent, ds, c, r"{tmp_path / 'cut'}", seed=3, progress=False, stop_at=9)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parent.parent)
    c = cfg(total_steps=16, eval_every=8, log_every=4)
    c.rollout_freq, c.model_retain_epochs = 1000, 5  # defaults
    torch.manual_seed(0)
    full_agent = CQL(hopper_random.obs_dim, hopper_random.act_dim, CQLConfig(hidden=TINY))
    full = offline_loop(full_agent, hopper_random, c, tmp_path / "full", seed=3, progress=False)
    resumed_agent = CQL(hopper_random.obs_dim, hopper_random.act_dim, CQLConfig(hidden=TINY))
    resumed = offline_loop(resumed_agent, hopper_random, c, tmp_path / "cut", seed=3,
                           progress=False)
    same_run(full, resumed, full_agent, resumed_agent)
    assert full["critic_loss"].notna().sum() == 4


def test_loop_rejects_mismatched_checkpoint_and_missing_generator(hopper_random, tmp_path):
    run_td3bc(hopper_random, tmp_path, stop_at=4)
    with pytest.raises(ValueError, match="different offline config"):
        run_td3bc(hopper_random, tmp_path, batch_size=64)
    with pytest.raises(ValueError, match="needs a rollout generator"):
        run_td3bc(hopper_random, tmp_path / "x", real_ratio=0.5)
    with pytest.raises(ConfigError, match="offline.real_ratio"):
        cfg(real_ratio=1.5)


def test_log_fn_receives_logged_rows(hopper_random, tmp_path):
    seen = []
    torch.manual_seed(0)
    agent = TD3BC.from_dataset(hopper_random, TD3BCConfig(hidden=TINY))
    offline_loop(agent, hopper_random, cfg(total_steps=8), tmp_path, seed=0,
                 log_fn=lambda m, s: seen.append((s, m)), progress=False)
    assert [s for s, _ in seen] == [4, 8]
    assert "critic_loss" in seen[0][1] and "normalized_score" in seen[1][1]


# --- evaluation and train_policy -------------------------------------------------------------

def test_evaluate_is_batched_deterministic_and_normalised():
    torch.manual_seed(0)
    agent = SAC(11, 3, SACConfig(hidden=TINY))
    r1 = evaluate(agent, "hopper-medium-v2", episodes=3, seed=5)
    r2 = evaluate(agent, "hopper-medium-v2", episodes=3, seed=5)
    assert r1 == r2 and len(r1["lengths"]) == 3
    assert all(1 <= n <= 1000 for n in r1["lengths"])
    ref_min, ref_max = -20.272305, 3234.3
    assert r1["normalized_score"] == pytest.approx(
        100 * (r1["return_mean"] - ref_min) / (ref_max - ref_min))


def test_unknown_method_fails_before_training(hopper_random, tmp_path):
    with pytest.raises(KeyError, match="unknown method 'td3\\+bc'; known: .*'td3bc'"):
        train_policy("td3+bc", hopper_random, PolicyConfig(), tmp_path, seed=0)
    assert not any(tmp_path.iterdir())


def test_train_policy_writes_final_json(hopper_random, tmp_path):
    pc = from_dict(PolicyConfig, {"offline": {"total_steps": 6, "batch_size": 16,
                                              "eval_every": 6, "eval_episodes": 2,
                                              "log_every": 3, "checkpoint_every": 3},
                                  "agent": {"hidden": TINY}}, where="policy")
    out = train_policy("td3bc", hopper_random, pc, tmp_path, seed=1, progress=False)
    on_disk = json.loads((tmp_path / "final.json").read_text())
    assert on_disk == out
    assert {"method", "task", "seed", "normalized_score", "return_mean", "return_std",
            "eval_episodes", "steps", "wall_time_s", "git_sha", "config_hash"} <= set(out)
    assert out["steps"] == 6 and out["task"] == "hopper-random" and out["eval_episodes"] == 2
    assert isinstance(out["normalized_score"], float)
    agent, method = load_policy(tmp_path / "policy.pt")
    assert method == "td3bc" and isinstance(agent, TD3BC)
    res = evaluate(agent, "hopper-random", episodes=2, seed=eval_seed(1, 6))
    assert res["return_mean"] == pytest.approx(out["return_mean"])
    again = train_policy("td3bc", hopper_random, pc, tmp_path, seed=1, progress=False)
    assert again["normalized_score"] == out["normalized_score"]  # resumed from the final ckpt
