"""Deterministic fault injection over the storage seam (after borg's failing stores and kopia's
``fault`` package): a wrapper backend whose calls fail on a schedule."""

from __future__ import annotations

import errno
import time

from umbra.errors import ProviderError, RepositoryFull, RepositoryIOError
from umbra.providers.base import Kind, Provider, Snapshot
from umbra.repo.backends.base import Backend, ForwardingBackend
from umbra.volume.mounts import VolumeInfo


class FaultyBackend(ForwardingBackend):
    """Wraps a backend; ``fail_on={"store": "..E"}`` makes the third ``store`` fail (``.`` = pass,
    ``E`` = fail; calls past the end of the map pass).  ``error_errno`` picks ENOSPC or EIO."""

    def __init__(self, inner: Backend, fail_on: dict[str, str], error_errno: int = errno.EIO) -> None:
        super().__init__(inner)
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

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        self._maybe_fail("load", name)
        return self.inner.load(name, offset, length)

    def store(self, name: str, data: bytes, replace: bool = False) -> None:
        self._maybe_fail("store", name)
        self.inner.store(name, data, replace)

    def delete(self, name: str) -> None:
        self._maybe_fail("delete", name)
        self.inner.delete(name)


class CorruptingBackend(ForwardingBackend):
    """Wraps a backend; loads of packs (``data/``) come back with one bit flipped: only the first
    load of each pack (``always=False``: a flaky disk or cable) or every load (rot on the disk).
    After restic's ``errorOnceBackend`` (RELIABILITY B5)."""

    def __init__(self, inner: Backend, always: bool = False) -> None:
        super().__init__(inner)
        self.always = always
        self.garbled: list[str] = []

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        data = self.inner.load(name, offset, length)
        if not name.startswith("data/") or not data or (name in self.garbled and not self.always):
            return data
        self.garbled.append(name)
        flipped = bytearray(data)
        flipped[len(flipped) // 2] ^= 0x10
        return bytes(flipped)


class FaultyProvider(Provider):
    """A provider that wraps ``direct``/``reflink`` behaviour with a scripted fault at commit:
    ``mode`` = "fail" (ProviderError), "hang" (sleeps ``hang_s``), "signal" (writes the word
    "committing" to ``signal_path`` and then hangs).  Registered under the name ``faulty``."""

    name = "faulty"
    kind = Kind.SYSTEM
    description = "test-only provider with scripted faults"
    mode = "fail"
    hang_s = 3600.0
    signal_path = ""
    only_volume: str | None = None  # fault only this source; others delegate to the real provider

    def __init__(self) -> None:
        self._inner: dict[str, Provider] = {}

    def _delegate(self, volume: VolumeInfo) -> Provider:
        if volume.source not in self._inner:
            self._inner[volume.source] = select_real(volume)
        return self._inner[volume.source]

    def probe(self, volume: VolumeInfo) -> str | None:
        return None

    def writes_to(self, volume: VolumeInfo) -> str | None:
        return self._delegate(volume).writes_to(volume)

    def prepare(self, volume: VolumeInfo, set_id: str) -> None:
        self._delegate(volume).prepare(volume, set_id)

    def commit(self, volume: VolumeInfo) -> Snapshot:
        if self.only_volume is None or volume.source == self.only_volume:
            if self.mode == "signal":
                with open(self.signal_path, "w") as f:
                    f.write("committing")
            if self.mode in ("hang", "signal"):
                time.sleep(self.hang_s)
            else:
                raise ProviderError(provider=self.name, volume=volume.source, reason="injected commit failure")
        return self._delegate(volume).commit(volume)

    def delete(self, snapshot: Snapshot) -> None:
        self._delegate(snapshot.volume).delete(snapshot)

    def abort(self, volume: VolumeInfo) -> None:
        self._delegate(volume).abort(volume)


def select_real(volume: VolumeInfo) -> Provider:
    from umbra.providers import registry

    return registry.select(volume, [c.name for c in registry.PROVIDERS if c.name != "faulty"])
