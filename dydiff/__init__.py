"""dydiff-bench: DyDiff (dynamics diffusion, arXiv 2405.19189) and the shared offline-RL core."""

__version__ = "0.1.0"
