"""Ensemble model-based baselines (MOPO, MBPO-style) for dydiff-bench."""
