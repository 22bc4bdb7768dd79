"""SIGINT and SIGTERM as requests to stop at the next safe point (imports nothing from difflab).

Batch schedulers (SLURM, Kubernetes) send SIGTERM some time before they kill a job; Ctrl-C sends
SIGINT. Inside ``StopRequests`` the first of either only sets ``requested``: the loop finishes its
step, saves and raises ``Interrupted``. A second signal aborts at once (``KeyboardInterrupt``).
"""
from __future__ import annotations

import signal
import sys
import threading

NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class Interrupted(Exception):
    """Work stopped at a safe point on a signal; the process should exit with ``exit_code``."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 after SIGINT, 143 after SIGTERM


class StopRequests:
    """While entered, SIGINT and SIGTERM request a stop instead of ending the process (only in the
    main thread, where Python delivers signals; elsewhere it changes nothing)."""

    def __init__(self, what: str = "finishing this step and saving a checkpoint"):
        self.what, self.signum, self.previous = what, None, {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in NAMES}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"difflab: {NAMES[signum]} received: {self.what} (Ctrl-C again aborts at once)",
              file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return NAMES.get(self.signum, "a stop request")
