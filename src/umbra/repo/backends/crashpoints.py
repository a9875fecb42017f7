"""Crash points by counter (RELIABILITY A2), test-only.

``UMBRA_TESTONLY_CRASH_AT=k`` ends the process with ``os._exit(137)`` right before its *k*-th
mutating storage call (``store``, ``delete``), as a ``kill -9`` at that instant would: no
``finally`` runs, no lock is released.  ``UMBRA_TESTONLY_CRASH_LOG=FILE`` appends one line per
mutating call (``number op name``), so a dry run tells a test how many crash points a command
has and a failing one names the call it stopped before.  Both are honoured only under pytest
(:mod:`umbra.testing_knobs`).
"""

from __future__ import annotations

import os

from umbra.repo.backends.base import Backend, ForwardingBackend

CRASH_EXIT = 137  # what a shell reports for a process killed by SIGKILL
_calls = 0  # mutating calls of this process, over every backend it opened


class CrashPoints(ForwardingBackend):
    def __init__(self, inner: Backend, crash_at: int | None, log: str | None) -> None:
        super().__init__(inner)
        self.crash_at = crash_at
        self.log = log

    def _mutating(self, op: str, name: str) -> None:
        global _calls
        _calls += 1
        if self.log is not None:
            with open(self.log, "a") as f:
                f.write(f"{_calls} {op} {name}\n")
        if _calls == self.crash_at:
            os._exit(CRASH_EXIT)

    def store(self, name: str, data: bytes, replace: bool = False) -> None:
        self._mutating("store", name)
        self.inner.store(name, data, replace)

    def delete(self, name: str) -> None:
        self._mutating("delete", name)
        self.inner.delete(name)

    def remove_temporaries(self) -> int:
        self._mutating("remove_temporaries", "-")
        return self.inner.remove_temporaries()
