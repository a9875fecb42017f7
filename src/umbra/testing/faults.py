"""Deterministic fault injection over the storage seam (after borg's failing stores and kopia's
``fault`` package): a wrapper backend whose calls fail on a schedule."""

from __future__ import annotations

import errno
from collections.abc import Iterator

from umbra.errors import RepositoryFull, RepositoryIOError
from umbra.repo.backends.base import Backend


class FaultyBackend(Backend):
    """Wraps a backend; ``fail_on={"store": "..E"}`` makes the third ``store`` fail (``.`` = pass,
    ``E`` = fail; calls past the end of the map pass).  ``error_errno`` picks ENOSPC or EIO."""

    def __init__(self, inner: Backend, fail_on: dict[str, str], error_errno: int = errno.EIO) -> None:
        self.inner = inner
        self.location = inner.location
        self.fail_on = fail_on
        self.error_errno = error_errno
        self.calls: dict[str, int] = {}
        self.failures = 0

    def _maybe_fail(self, op: str, name: str) -> None:
        n = self.calls.get(op, 0)
        self.calls[op] = n + 1
        plan = self.fail_on.get(op, "")
        if n < len(plan) and plan[n] == "E":
            self.failures += 1
            if self.error_errno == errno.ENOSPC:
                raise RepositoryFull(name=name)
            raise RepositoryIOError(name=name, reason="injected I/O error")

    def exists(self) -> bool:
        return self.inner.exists()

    def create(self) -> None:
        self.inner.create()

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        self._maybe_fail("load", name)
        return self.inner.load(name, offset, length)

    def store(self, name: str, data: bytes, replace: bool = False) -> None:
        self._maybe_fail("store", name)
        self.inner.store(name, data, replace)

    def delete(self, name: str) -> None:
        self._maybe_fail("delete", name)
        self.inner.delete(name)

    def size(self, name: str) -> int:
        return self.inner.size(name)

    def list(self, directory: str) -> Iterator[str]:
        return self.inner.list(directory)
