"""The offline training loop every method shares: buffers, evaluation, policy and model steps."""
