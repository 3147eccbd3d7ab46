"""Agents (SAC, TD3+BC, CQL), buffers and the one offline training loop."""
