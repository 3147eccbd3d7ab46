"""D4RL-style datasets generated locally with D4RL's recipe (one online SAC run per family)."""
