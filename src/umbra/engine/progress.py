"""Progress events: the engine reports, the caller (CLI, server, tests) decides how to show them."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, task: str, total_bytes: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def finish(self) -> None: ...


class NoProgress:
    """Reports nothing."""

    def start(self, task: str, total_bytes: int) -> None:
        self.task = task

    def advance(self, nbytes: int) -> None:
        self.done = getattr(self, "done", 0) + nbytes

    def finish(self) -> None:
        self.finished = True
