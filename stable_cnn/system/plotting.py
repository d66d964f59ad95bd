"""Figures without a display: matplotlib with its file-only backend, set up in one place
for the confusion matrix, the sweep report and the studies' plots."""

from __future__ import annotations

import importlib.util
import sys
import threading
from types import ModuleType


def pyplot() -> ModuleType | None:
    """matplotlib.pyplot on the Agg backend (files only, no display needed), or None where
    matplotlib cannot be imported (the figure is then left out, with a note)."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    if "matplotlib.pyplot" not in sys.modules:
        # The first import runs on a thread of its own, whose stack holds nothing: while
        # matplotlib imports, pyparsing keeps an exception whose traceback pins every
        # frame of the importing stack, and with them what those frames hold (from
        # log_figures: the whole run, its DataLoader workers included, for good).
        importer = threading.Thread(target=import_pyplot, name="import matplotlib")
        importer.start()
        importer.join()
    return import_pyplot()


def import_pyplot() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
