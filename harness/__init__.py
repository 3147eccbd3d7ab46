"""What every method stands on: config, plan, registry, cli, tracking, checkpoints, envs, nets,
data and the offline training loop. Imports nothing from the packages above it."""

__version__ = "0.1.0"
