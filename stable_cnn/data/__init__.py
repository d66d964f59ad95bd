"""Datasets -> batches: the run's train, validation and test splits (build.py)."""
