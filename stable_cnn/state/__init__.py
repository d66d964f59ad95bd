"""A run that survives: checkpoints, the run's state and its epoch's running sums, resume,
the run lock, and what a run folder records."""
