"""Datasets: D4RL hdf5 files, Minari, the in-memory Dataset and its checks."""
