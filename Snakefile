# dydiff-bench: datasets -> models -> policies -> evaluation -> analysis, for a grid of
# tasks x methods x seeds. Thin on purpose: every rule calls `dydiff-bench <step>`; job specs
# (what reruns when a value changes) and every output path come from harness/plan.py, the
# methods from harness/registry.py.
#   snakemake --cores all                                   # config/smoke.yaml (default)
#   snakemake --cores all --configfile config/paper.yaml    # the paper grid
#   snakemake --cores all --profile slurm                   # on a SLURM cluster
import os
import sys
import uuid

from snakemake.utils import min_version, update_config

min_version("9.0")

# The smoke config is the default; a --configfile on the command line replaces it (not merged).
if not workflow.overwrite_configfiles:
    configfile: "config/smoke.yaml"

from harness import plan, registry
from harness.config import ConfigError, typed

sys.path.insert(0, os.path.join(workflow.basedir, "workflow"))
import slurm_compat

# `scancel`led jobs must be retried, not waited on forever (see workflow/slurm_compat.py).
slurm_compat.patch_cancelled_state()

# `--config key=value` values arrive as strings ('0', 'false'): give them their YAML types.
update_config(config, typed(workflow.config_settings.overwrite_config))
_overrides = typed(workflow.config_settings.config)  # the --config pairs alone
try:
    # schema (shape), ablations -> methods, job settings; a grid narrowed by --config drops
    # the file's per-task / per-method settings of what it no longer runs.
    config.update(plan.resolve(config, _overrides))
except ConfigError as err:
    sys.exit(f"Invalid config: {err}")

# Rules call `dydiff-bench`, installed next to the Python running Snakemake (e.g. .venv/bin):
# put it on PATH so `.venv/bin/snakemake` works without activating the environment.
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])
# Groups every job of one `snakemake` invocation in MLflow (tag dag_run); inherited by jobs,
# also on SLURM where each job re-reads this file.
DAG_RUN = os.environ.setdefault("DYDIFF_DAG_RUN", uuid.uuid4().hex[:12])


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/policies.smk"
include: "workflow/rules/rollout_error.smk"
include: "workflow/rules/analysis.smk"


rule all:
    input:
        final_outputs(),
    default_target: True
