"""Training: what a run is built from (build.py), its epochs (fit.py), one epoch (epoch.py),
one step (step.py; captured in a CUDA graph: captured_step.py), and what they use:
optimizers, schedules, diagnostics, tracking."""
