"""Figures without a display: matplotlib with its file-only backend, set up in one place
for the confusion matrix, the sweep report and the studies' plots."""

from __future__ import annotations

from types import ModuleType


def pyplot() -> ModuleType | None:
    """matplotlib.pyplot on the Agg backend (files only, no display needed), or None where
    matplotlib cannot be imported (the figure is then left out, with a note)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
