"""The logger group (conf/logger/): the experiment stores a run reports to besides
TensorBoard, which always writes. Each option turns its store on (``logger=csv``), and
several may be chosen at once (``logger=[csv,...]``): their keys sit side by side here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoggerConfig:
    csv: bool = False  # logger=csv: metrics.csv in the run folder, one row per epoch

    @property
    def trackers(self) -> tuple[str, ...]:
        """The stores turned on, besides TensorBoard."""
        return tuple(name for name in ("csv",) if getattr(self, name))
