"""Stop at a step boundary on SIGTERM or SIGINT (Ctrl-C, SLURM preemption), so that the
run can save a resumable checkpoint; a second signal stops at once."""

from __future__ import annotations

import signal
from types import FrameType

# Exit status of a run stopped by a signal after saving its checkpoint: EX_TEMPFAIL,
# "try again later" (resume with trainer.resume=auto).
EXIT_PREEMPTED = 75


class GracefulStop:
    """Install with ``with GracefulStop() as stop:``; poll ``stop.requested`` between steps."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        for sig in self.SIGNALS:  # the next signal takes the default action: exit at once
            signal.signal(sig, self._previous.get(sig, signal.SIG_DFL))

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
