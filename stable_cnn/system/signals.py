"""Stop at a step boundary on SIGTERM or SIGINT (Ctrl-C, SLURM preemption), so that the
run can save a resumable checkpoint; a second signal (after REPEAT_WINDOW_S) stops at once."""

from __future__ import annotations

import signal
import time
from types import FrameType

# A second signal this soon after the first is the same request delivered twice: under
# SLURM the step's processes get SIGTERM from slurmstepd and again from torchrun.
REPEAT_WINDOW_S = 2.0


class GracefulStop:
    """Install with ``with GracefulStop() as stop:``; poll ``stop.requested`` between steps."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.signal_name is None:
            self.signal_name, self._first_at = signal.Signals(signum).name, now
            return
        if now - self._first_at < REPEAT_WINDOW_S:
            return  # the same stop, delivered twice (SLURM signals the step, torchrun again)
        for sig in self.SIGNALS:  # a second request: the default action, exit at once
            signal.signal(sig, self._previous.get(sig, signal.SIG_DFL))
        signal.raise_signal(signum)

    def __enter__(self) -> GracefulStop:
        for sig in self.SIGNALS:
            try:
                previous = signal.getsignal(sig)
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (some launchers): leave signals alone
                continue
            self._previous[sig] = previous
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
