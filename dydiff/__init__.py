"""DyDiff (Zhao et al. 2024, arXiv 2405.19189), the method only: EDM preconditioning and loss,
temporal U-Net, sampler with policy injection, trajectory filter, reward model, rollouts."""
