"""Analysis of dydiff-bench runs: rliable aggregates, rollout error, paper tables."""
