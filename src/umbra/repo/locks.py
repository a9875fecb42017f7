"""Repository locks: shared for backup (and restore, check), exclusive for prune.

A lock is a small JSON file ``locks/<id>`` refreshed by a background thread.  A lock is *stale*
when its holder's refresh is older than the TTL, or its holder is a dead process on this host;
stale locks are removed by whoever finds them.  A holder that cannot prove it kept its lock (its
file is gone, or more than a TTL passed since its last successful refresh, e.g. after SIGSTOP or a
suspend) raises :class:`LockLost` at its next :meth:`Lock.check`; backups call it before and after
publishing a manifest, so no point is ever published under a lost lock.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from umbra.errors import IntegrityError, LockLost, ObjectMissing, RepositoryLocked
from umbra.repo.backends.base import Backend
from umbra.testing_knobs import testonly_int

log = logging.getLogger(__name__)
DEFAULT_TTL = 30 * 60


def lock_ttl() -> float:
    return float(testonly_int("LOCK_TTL") or DEFAULT_TTL)


def _boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass(frozen=True)
class LockInfo:
    name: str
    exclusive: bool
    host: str
    pid: int
    refreshed: float

    def describe(self) -> str:
        kind = "exclusive" if self.exclusive else "shared"
        return f"{kind} lock of pid {self.pid} on {self.host}"

    def is_stale(self, now: float, ttl: float) -> bool:
        if now - self.refreshed > ttl:
            return True
        if self.host == socket.gethostname():
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False


def read_locks(backend: Backend) -> list[LockInfo]:
    out = []
    for name in backend.list("locks"):
        try:
            d = json.loads(backend.load(name))
            out.append(LockInfo(name, bool(d["exclusive"]), str(d["host"]), int(d["pid"]), float(d["refreshed"])))
        except ObjectMissing:
            continue
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
            raise IntegrityError(f"lock file {name} is malformed; remove it by hand if no umbra runs") from None
    return out


class Lock:
    def __init__(self, backend: Backend, exclusive: bool, ttl: float | None = None) -> None:
        self.backend = backend
        self.exclusive = exclusive
        self.ttl = ttl if ttl is not None else lock_ttl()
        self.name = f"locks/{os.urandom(8).hex()}"
        self._last_refresh = 0.0
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _document(self) -> bytes:
        d: dict[str, Any] = {
            "exclusive": self.exclusive,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "refreshed": time.time(),
        }
        return json.dumps(d).encode()

    def _conflicts(self) -> list[LockInfo]:
        now = time.time()
        conflicts = []
        for info in read_locks(self.backend):
            if info.name == self.name:
                continue
            if info.is_stale(now, self.ttl):
                try:
                    self.backend.delete(info.name)
                except ObjectMissing:
                    pass
                continue
            if self.exclusive or info.exclusive:
                conflicts.append(info)
        return conflicts

    def acquire(self) -> None:
        """Take the lock or raise :class:`RepositoryLocked` naming a holder."""
        conflicts = self._conflicts()
        if conflicts:
            raise RepositoryLocked(holder=conflicts[0].describe())
        self.backend.store(self.name, self._document())
        self._last_refresh = _boottime()
        conflicts = self._conflicts()  # someone may have raced us in between
        if conflicts:
            self.backend.delete(self.name)
            raise RepositoryLocked(holder=conflicts[0].describe())
        self._thread = threading.Thread(target=self._refresher, name="umbra-lock", daemon=True)
        self._thread.start()

    def _refresher(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.refresh()
            except LockLost as exc:
                self._lost = exc.fields.get("reason", "lost")
                return
            except Exception as exc:  # noqa: BLE001 - a failed refresh only matters at check()
                log.warning("could not refresh repository lock %s: %s", self.name, exc)

    def refresh(self) -> None:
        self.check()
        self.backend.store(self.name, self._document(), replace=True)
        self._last_refresh = _boottime()

    def check(self) -> None:
        """Raise :class:`LockLost` unless this process provably still holds the lock."""
        if self._lost:
            raise LockLost(reason=self._lost)
        if _boottime() - self._last_refresh > self.ttl:
            self._lost = "not refreshed within its TTL; another process may have removed it"
            raise LockLost(reason=self._lost)
        try:
            self.backend.load(self.name)
        except ObjectMissing:
            self._lost = "its lock file was removed by another process"
            raise LockLost(reason=self._lost) from None

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.backend.delete(self.name)
        except ObjectMissing:
            pass
