"""The registry: every agent, model, method and step the harness knows, each written once.

The config schema, job planning, training, analysis and plots all read these tables, so adding
a method is one `register_method(...)` (here, or in a module of your own named in
`DYDIFF_BENCH_PLUGINS`) plus the method's own code. Code in higher layers (agents/, baselines/,
dydiff/, datagen/, analysis/) is named as "module:attr" and imported by `resolve` only when a
job uses it: this lowest layer never imports a higher one.

A *variant* (an ablation, another source's preset) is `variant_of(base, name, ...)`: the
base's agent, models and rollout generator with config overrides, compared with its base in
the P(improvement) statistics.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field, replace
from typing import Any



@dataclass(frozen=True)
class Agent:
    """A learner every method trains: `cls.from_dataset(dataset, cfg)`, settings in
    `policy.<name>` of the config, validated by the dataclass `config`."""
    name: str
    cls: str
    config: str


@dataclass(frozen=True)
class Model:
    """A dynamics/reward model trained once per task (`train(dataset, cfg, out_dir, seed,
    log_fn, progress)` writes out_dir/model.pt, `load(out_dir, device)` reads it back);
    settings in `models.<name>`."""
    name: str
    config: str
    train: str
    load: str


@dataclass(frozen=True)
class Method:
    """One row of every table: an agent, optionally trained on a model's rollouts.

    generator: "module:make_generator" (`make_generator(dataset, cfg, model_dirs, device)`),
        None for a model-free method; `rollout_config` validates `policy.methods.<name>.rollout`.
    pinned_rollout: rollout settings that define the method; a user value for them is an error.
    parent: the method a variant is derived from: it inherits the parent's settings, config
        section (`policy.methods.<parent>`) included, then applies its own.
    overrides: config overrides under `policy` the method applies after its parent's settings
        and before the user's own `policy.methods.<name>` (how a variant differs).
    per_task: {task: overrides} applied after `overrides` on that task only (a source's
        per-task table, e.g. Wang's grad-norms); the config's `per_task` section still wins.
    base: the method it is compared with for P(improvement) (DyDiff-X vs X; a variant vs its
        base); methods sharing a base form one family table.
    published: source ids in analysis/published.yaml whose numbers sit next to this method.
    ablation: the ablation group a variant belongs to; a config's `ablations: [group, ...]`
        adds every variant of that group whose base it runs.
    compare: False for a preset (the base with another source's settings, e.g. cql-corl):
        tabled in the base's family, next to its source's column, without P(improvement).
    gpu: its policy job runs on a GPU where the config offers one (`resources.policy.gpu`;
        harness.plan.job_device): worth it where the work is batched network passes (DyDiff's
        sampler), not where it is a small MLP update and MuJoCo (README: Cluster, Devices).
    """
    name: str
    label: str
    color: str
    agent: str
    source: str
    generator: str | None = None
    rollout_config: str | None = None
    models: tuple[str, ...] = ()
    pinned_rollout: dict[str, Any] = field(default_factory=dict)
    parent: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    per_task: dict[str, dict[str, Any]] = field(default_factory=dict)
    base: str | None = None
    published: tuple[str, ...] = ()
    ablation: str | None = None
    compare: bool = True
    gpu: bool = False

    @property
    def model_based(self) -> bool:
        return self.generator is not None


AGENTS: dict[str, Agent] = {}
MODELS: dict[str, Model] = {}
METHODS: dict[str, Method] = {}

# `dydiff-bench <step>` -> the function that runs one job spec: `fn(spec, log_fn) -> dict`.
STEPS: dict[str, str] = {
    "generate-datasets": "datagen.generate:generate_step",
    "import-dataset": "harness.data.sources:import_step",
    "train-model": "harness.training.models:train_model_step",
    "train-policy": "harness.training.policy:train_policy_step",
    "evaluate": "harness.training.evaluation:evaluate_step",
    "rollout-error": "analysis.rollout_error:rollout_error_step",
    "analyze": "analysis.report:analyze_step",
}


def resolve(ref: str) -> Any:
    """Import "module:attr" (the one place the harness imports by name)."""
    module, sep, attr = ref.partition(":")
    if not sep:
        raise ValueError(f"expected 'module:attr', got {ref!r}")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"cannot import {ref!r}: {err}") from err


def register_agent(agent: Agent) -> Agent:
    AGENTS[agent.name] = agent
    return agent


def register_model(model: Model) -> Model:
    MODELS[model.name] = model
    return model


def register_method(method: Method) -> Method:
    """Add a method; its agent, models and base must already be registered."""
    if method.agent not in AGENTS:
        raise ValueError(f"method {method.name!r}: unknown agent {method.agent!r}; "
                         f"known: {sorted(AGENTS)}")
    unknown = sorted(set(method.models) - set(MODELS))
    if unknown:
        raise ValueError(f"method {method.name!r}: unknown model(s) {unknown}")
    if method.base is not None and method.base not in METHODS:
        raise ValueError(f"method {method.name!r}: unknown base method {method.base!r}")
    if (method.generator is None) != (method.rollout_config is None):
        raise ValueError(f"method {method.name!r}: give both generator and rollout_config "
                         f"(model-based) or neither (model-free)")
    METHODS[method.name] = method
    return method


def variant_of(base: str, name: str, label: str, color: str, overrides: dict,
               source: str, **changes) -> Method:
    """Register a variant of `base`: its settings plus `overrides`, compared with `base`."""
    changes.setdefault("ablation", None)  # a variant of an ablation is not that ablation
    changes.setdefault("published", ())   # the base's published numbers are not the variant's
    changes.setdefault("per_task", {})    # the base's are applied as its own (lineage)
    return register_method(replace(METHODS[base], name=name, label=label, color=color,
                                   parent=base, overrides=overrides, base=base, source=source,
                                   **changes))


def lineage(name: str) -> list[Method]:
    """The method and the methods it is derived from, root first."""
    chain = [method(name)]
    while chain[0].parent is not None:
        chain.insert(0, METHODS[chain[0].parent])
    return chain


def comparisons() -> list[tuple[str, str]]:
    """The (X, Y) pairs of P(X > Y): DyDiff-X over X (does the model help?), a variant over
    its base, and each method over its ablation variants (does the removed component help?).
    A preset (`compare=False`) is tabled in its base's family but asks no question."""
    return [(m.base, m.name) if m.ablation else (m.name, m.base)
            for m in METHODS.values() if m.base is not None and m.compare]


def ablation_groups() -> list[str]:
    return list(dict.fromkeys(m.ablation for m in METHODS.values() if m.ablation))


def with_ablations(methods: list[str], groups: list[str]) -> list[str]:
    """`methods` plus every variant of the named ablation groups whose base is in `methods`."""
    extra = [m.name for m in METHODS.values()
             if m.ablation in groups and m.base in methods and m.name not in methods]
    return list(methods) + extra


def method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {list(METHODS)}") from None


def families() -> dict[str, list[str]]:
    """{base: [base, every method compared with it]} for each base some method names."""
    out: dict[str, list[str]] = {}
    for m in METHODS.values():
        if m.base is not None:
            out.setdefault(m.base, [m.base]).append(m.name)
    return out


# ---- the learners ----------------------------------------------------------------------------
register_agent(Agent("td3bc", "agents.td3bc:TD3BC", "agents.td3bc:TD3BCConfig"))
register_agent(Agent("cql", "agents.cql:CQL", "agents.cql:CQLConfig"))
register_agent(Agent("sac", "agents.sac:SAC", "agents.sac:SACConfig"))
register_agent(Agent("diffql", "agents.diffql:DiffQL", "agents.diffql:DiffQLConfig"))

# ---- the models (trained once per task, shared by every method that needs them) ------------
register_model(Model("ensemble", "baselines.ensemble:EnsembleConfig",
                     "baselines.ensemble:train_ensemble", "baselines.ensemble:load_ensemble"))
# The same ensemble as the DyDiff authors train it (standardised-state targets, no reward
# head, last weights, ...): the start of DyDiff's policy injection, so MOPO / MBPO keep theirs.
register_model(Model("ensemble-dydiff", "baselines.ensemble:DyDiffEnsembleConfig",
                     "baselines.ensemble:train_ensemble", "baselines.ensemble:load_ensemble"))
register_model(Model("reward", "dydiff.reward_model:RewardModelConfig",
                     "dydiff.reward_model:train_reward_model",
                     "dydiff.reward_model:load_reward_model"))
register_model(Model("diffusion", "dydiff.diffusion:DiffusionConfig",
                     "dydiff.diffusion:train_diffusion", "dydiff.diffusion:load_diffusion"))


def load_model(name: str, out_dir, device="cpu"):
    """A trained model read back through the registry: how a method uses another layer's
    model (DyDiff starts its rollouts from an ensemble of baselines/) without importing it."""
    return resolve(MODELS[name].load)(out_dir, device)

# ---- the methods (table and figure order) ----------------------------------------------------
register_method(Method(
    "td3bc", "TD3+BC", "#1f77b4", agent="td3bc", published=("corl", "offlinerl-kit"),
    source="Fujimoto & Gu 2021; settings from CORL algorithms/offline/td3_bc.py"))
register_method(Method(
    "dydiff-td3bc", "DyDiff-TD3BC", "#ff7f0e", agent="td3bc", base="td3bc",
    generator="dydiff.rollout:make_generator", rollout_config="dydiff.rollout:DyDiffConfig",
    models=("diffusion", "reward", "ensemble-dydiff"), published=("dydiff-paper",), gpu=True,
    source="Zhao et al. 2024 (arXiv 2405.19189); github.com/FineArtz/DyDiff"))
# `cql` is DyDiff-CQL's model-free control: both read the config's `policy.cql` (paper.yaml: the
# DyDiff authors' settings), so the pair differs only in its rollouts. The published CQL
# numbers were produced with other settings, so they sit next to the presets below instead.
register_method(Method(
    "cql", "CQL, DyDiff-CQL settings", "#2ca02c", agent="cql",
    source="Kumar et al. 2020; the settings of DyDiff-CQL (config policy.cql; paper.yaml: "
           "the DyDiff authors', github.com/FineArtz/DyDiff exp_specs/dydiff_cql*)"))
register_method(Method(
    "dydiff-cql", "DyDiff-CQL", "#d62728", agent="cql", base="cql",
    generator="dydiff.rollout:make_generator", rollout_config="dydiff.rollout:DyDiffConfig",
    models=("diffusion", "reward", "ensemble-dydiff"), published=("dydiff-paper",), gpu=True,
    source="Zhao et al. 2024 (arXiv 2405.19189); github.com/FineArtz/DyDiff"))

# CQL as a published source runs it: a complete agents/cql.py CQLConfig (every field, so the
# config's shared `policy.cql` section cannot leak in), next to that source's column. Values
# and the file each comes from: baselines/reference_settings.yaml (tests/
# test_reference_settings.py checks both agree). Per-task differences (CORL's hopper-medium
# reward normalisation) live in the config's per_task section.
_CQL_COMMON = {"gamma": 0.99, "tau": 0.005, "auto_alpha": True, "alpha": 1.0,
               "target_entropy": None, "temperature": 1.0, "num_repeat_actions": 10,
               "deterministic_backup": True, "with_lagrange": False, "max_action": 1.0,
               "log_alpha_clamp": None, "alpha_before_actor": False, "importance_sample": True,
               "max_target_backup": False, "actor_lr_schedule": "constant",
               "actor_lr_schedule_steps": None, "actor_lr_schedule_every": 1, "alpha_max": None}
CQL_PRESETS = {
    "corl": {**_CQL_COMMON, "hidden": [256, 256, 256], "actor_lr": 3e-5, "critic_lr": 3e-4,
             "alpha_lr": 3e-5, "cql_weight": 10.0, "lagrange_threshold": -1.0,
             "cql_alpha_lr": 3e-4, "cql_log_alpha_init": 1.0, "normalize_obs": True,
             "obs_std_eps": 1e-3, "normalize_reward": False, "log_std_min": -20.0,
             "log_std_max": 2.0, "log_std_scale_offset": [1.0, -1.0], "weight_init": "corl",
             "losses_before_steps": True},
    "offlinerl-kit": {**_CQL_COMMON, "hidden": [256, 256, 256], "actor_lr": 1e-4,
                      "critic_lr": 3e-4, "alpha_lr": 1e-4, "cql_weight": 5.0,
                      "lagrange_threshold": 10.0, "cql_alpha_lr": 3e-4,
                      "cql_log_alpha_init": 0.0, "normalize_obs": False,
                      "obs_std_eps": 1e-3, "normalize_reward": False, "log_std_min": -5.0,
                      "log_std_max": 2.0, "log_std_scale_offset": None, "weight_init": "torch",
                      "losses_before_steps": False},
}
variant_of("cql", "cql-corl", "CQL, CORL settings", "#98df8a",
           overrides={"cql": CQL_PRESETS["corl"]}, published=("corl",), compare=False,
           source="CQL as CORL runs it: algorithms/offline/cql.py and "
                  "configs/offline/cql/<env>/<dataset>_v2.yaml (github.com/tinkoff-ai/CORL)")
variant_of("cql", "cql-offlinerl-kit", "CQL, OfflineRL-Kit settings", "#74c476",
           overrides={"cql": CQL_PRESETS["offlinerl-kit"]}, published=("offlinerl-kit",),
           compare=False,
           source="CQL as OfflineRL-Kit runs it: run_example/run_cql.py, offlinerlkit/policy/"
                  "model_free/cql.py (github.com/yihaosun1124/OfflineRL-Kit)")
# Diffusion-QL as each source runs it: complete agents/diffql.py DiffQLConfigs (values and
# lines: baselines/reference_settings.yaml; tests/test_reference_settings.py checks both agree).
# "wang": the original (github.com/Zhendong-Wang/Diffusion-Policies-for-Offline-RL; its per-task
# lr / eta / grad_norm / max_q_backup / reward_tune are in the config's per_task section).
# "dydiff-authors": the DyDiff authors' DiffQL (exp_specs/diffql/diffql_hopper_me.yaml).
_DIFFQL_COMMON = {"n_timesteps": 5, "beta_schedule": "vp", "actor_hidden": [256, 256, 256],
                  "t_dim": 16, "actor_lr": 3e-4, "critic_lr": 3e-4, "eta": 1.0,
                  "max_q_backup": False, "max_q_samples": 10, "reward_tune": "no",
                  "gamma": 0.99, "tau": 0.005, "ema_decay": 0.995, "step_start_ema": 1000,
                  "update_ema_every": 5, "lr_decay_every": 50_000, "lr_decay_t_max": 2000,
                  "eval_samples": 50, "max_action": 1.0, "obs_std_eps": 1e-6}
DIFFQL_PRESETS = {
    "wang": {**_DIFFQL_COMMON, "critic_hidden": [256, 256, 256], "critic_activation": "mish",
             "critic_init": "torch", "critic_optimizers": "joint", "grad_norm": 1.0,
             "q_term": "chain", "lr_decay": True, "normalize_obs": False},
    "dydiff-authors": {**_DIFFQL_COMMON, "critic_hidden": [256, 256],
                       "critic_activation": "relu", "critic_init": "edm",
                       "critic_optimizers": "per_critic", "grad_norm": 5.0,
                       "q_term": "one_step", "lr_decay": False, "normalize_obs": True},
}

register_method(Method(
    "mopo", "MOPO", "#9467bd", agent="sac", generator="baselines.mopo:make_generator",
    rollout_config="baselines.mopo:MOPOConfig", models=("ensemble",),
    published=("offlinerl-kit", "mopo-paper"),
    source="Yu et al. 2020; github.com/tianheyu927/mopo, OfflineRL-Kit"))
register_method(Method(
    "mbpo", "MBPO", "#8c564b", agent="sac", generator="baselines.mopo:make_generator",
    rollout_config="baselines.mopo:MOPOConfig", models=("ensemble",),
    pinned_rollout={"penalty": "none", "penalty_coef": 0.0}, published=("mopo-paper",),
    source="Janner et al. 2019, run offline as in the MOPO paper (MOPO without its penalty)"))

# `diffql` is DyDiff-DiffQL's model-free control: both read the config's `policy.diffql`
# (paper.yaml: the DyDiff authors' DiffQL, DIFFQL_PRESETS["dydiff-authors"]) and the same
# `offline` budget, so the pair differs only in its rollouts. The original Diffusion-QL is the
# preset `diffql-wang`, next to its paper's column.
register_method(Method(
    "diffql", "Diffusion-QL, DyDiff-DiffQL settings", "#17becf", agent="diffql",
    source="Wang et al. 2022; the settings of DyDiff-DiffQL (config policy.diffql; paper.yaml: "
           "the DyDiff authors', github.com/FineArtz/DyDiff exp_specs/diffql, "
           "rlkit/algo/diff_ql.py)"))
register_method(Method(
    "dydiff-diffql", "DyDiff-DiffQL", "#bcbd22", agent="diffql", base="diffql",
    generator="dydiff.rollout:make_generator", rollout_config="dydiff.rollout:DyDiffConfig",
    models=("diffusion", "reward", "ensemble-dydiff"), published=("dydiff-paper",), gpu=True,
    source="Zhao et al. 2024 (arXiv 2405.19189); github.com/FineArtz/DyDiff "
           "exp_specs/dydiff_diffql/*"))
variant_of("diffql", "diffql-wang", "Diffusion-QL, original settings", "#9edae5",
           overrides={"diffql": DIFFQL_PRESETS["wang"]}, compare=False,
           source="Diffusion-QL as its authors run it: main.py, agents/ql_diffusion.py "
                  "(github.com/Zhendong-Wang/Diffusion-Policies-for-Offline-RL)")

# Two variants of `diffql`, each changing one of the DyDiff authors' settings that paper.yaml
# documents as a choice; compared with `diffql` (P(variant > diffql)); not in the paper grid,
# config/diffql-variants.yaml runs them:
# - grad-norm: the authors publish one DiffQL spec, hopper-medium-expert's, whose clip 5 (= Wang's
#   hopper-medium-expert row) paper.yaml runs on every task; `diffql-gn-wang` takes Wang's
#   per-task `gn` instead (main.py:18-26; no random / maze2d row: `diffql-choice`, their median
#   5; a task in neither keeps 5). Values and lines: reference_settings.yaml diffql_presets
#   (tested to agree).
# - budget: the pair trains 500k updates (DyDiff-DiffQL's 2000 x 250), the authors' own DiffQL
#   2000 x 500 = 1M (exp_specs/diffql/diffql_hopper_me.yaml:18-19): `diffql-authors-1m`, the run
#   to set beside published DiffQL numbers.
WANG_GRAD_NORM = {
    "halfcheetah-medium": 9.0, "hopper-medium": 9.0, "walker2d-medium": 1.0,
    "halfcheetah-medium-replay": 2.0, "hopper-medium-replay": 4.0, "walker2d-medium-replay": 4.0,
    "halfcheetah-medium-expert": 7.0, "hopper-medium-expert": 5.0, "walker2d-medium-expert": 5.0,
    **dict.fromkeys(("halfcheetah-random", "hopper-random", "walker2d-random", "maze2d-umaze",
                     "maze2d-medium", "maze2d-large"), 5.0)}  # diffql-choice
variant_of("diffql", "diffql-gn-wang", "Diffusion-QL, DyDiff-DiffQL settings, Wang's grad-norms",
           "#0e7c86", overrides={},
           per_task={t: {"diffql": {"grad_norm": g}} for t, g in WANG_GRAD_NORM.items()},
           source="the DyDiff authors' DiffQL with the original's per-task grad-norm clip "
                  "(github.com/Zhendong-Wang/Diffusion-Policies-for-Offline-RL main.py:18-26)")
variant_of("diffql", "diffql-authors-1m", "Diffusion-QL, DyDiff-DiffQL settings, 1M updates",
           "#0a5a61", overrides={"offline": {"total_steps": 1_000_000}},
           source="the DyDiff authors' DiffQL run: 2000 epochs x 500 updates "
                  "(github.com/FineArtz/DyDiff exp_specs/diffql/diffql_hopper_me.yaml:18-19)")

# ---- DyDiff's variants: the authors' hardmax filter and the ablations that say why it works --
# Each changes one component of the generator (dydiff/rollout.py DyDiffConfig); the full method
# is compared with each (P(improvement)). Sources: docs/fidelity/dydiff-authors-code.md.
ABLATIONS = {  # group -> [(suffix, label, rollout overrides)]
    "filter": [("hardmax", "hardmax filter", {"filter": "hardmax"}),
               ("nofilter", "no filter", {"filter": "none"})],
    "injection": [("k0", "K=0", {"iterative_times": 0}),
                  ("k1", "K=1", {"iterative_times": 1})],
    "start": [("diffusion-start", "diffusion start", {"init": "diffusion"})],
    "clipping": [("noclip", "no clipping", {"clip": False})],
    "score": [("alive-score", "alive-rows score", {"score": "alive_rows"})],
}
_SHADES = {"dydiff-td3bc": ["#ffbb78", "#e6550d", "#fd8d3c", "#a63603", "#fdae6b", "#7f2704",
                            "#fdd0a2"],
           "dydiff-cql": ["#ff9896", "#a50f15", "#ef3b2c", "#67000d", "#fc9272", "#cb181d",
                          "#fcbba1"],
           "dydiff-diffql": ["#dbdb8d", "#8c8c00", "#b5b52b", "#5c5c00", "#e7e7a6", "#a3a300",
                             "#f0f0c8"]}
for _base in ("dydiff-td3bc", "dydiff-cql", "dydiff-diffql"):
    _colors = iter(_SHADES[_base])
    for _group, _variants in ABLATIONS.items():
        for _suffix, _what, _rollout in _variants:
            variant_of(_base, f"{_base}-{_suffix}", f"{METHODS[_base].label} ({_what})",
                       next(_colors), overrides={"rollout": _rollout}, ablation=_group,
                       source=("authors' hardmax spec, exp_specs/*hardmax*.yaml"
                               if _suffix == "hardmax" else f"ablation: {_what}"))
    # The `fast` sampler preset for rollouts (same trained model; not in any grid or ablation).
    variant_of(_base, f"{_base}-fastsampler", f"{METHODS[_base].label} (fast sampler)",
               {"dydiff-td3bc": "#d94801", "dydiff-cql": "#99000d",
                "dydiff-diffql": "#6b6b00"}[_base],
               overrides={"rollout": {"sampler": "fast"}},
               source="sampler preset 'fast' (docs/sampler-study.md)")


def _load_plugins() -> None:
    """Modules named in DYDIFF_BENCH_PLUGINS (comma-separated) register more methods; every
    process of a run (Snakemake, its jobs, SLURM jobs) inherits the variable."""
    for name in filter(None, (s.strip() for s in
                              os.environ.get("DYDIFF_BENCH_PLUGINS", "").split(","))):
        importlib.import_module(name)


_load_plugins()
