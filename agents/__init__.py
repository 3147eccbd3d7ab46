"""The learners every method trains: SAC, TD3+BC, CQL."""
