"""Storage backends: where repository objects live (local filesystem, memory; object storage later)."""

from __future__ import annotations

from umbra.repo.backends.base import Backend, ObjectMissing, validate_name
from umbra.repo.backends.local import LocalBackend
from umbra.repo.backends.mem import MemBackend
from umbra.testing_knobs import testonly_int, testonly_str

__all__ = ["Backend", "LocalBackend", "MemBackend", "ObjectMissing", "open_backend", "validate_name"]


def open_backend(location: str, token: str | None = None, ca_file: str | None = None) -> Backend:
    """A backend for a location string: a filesystem path (``file://`` prefix optional), or
    ``http(s)://HOST:PORT/NAME`` for a repository on a backup server (with its ``token``)."""
    backend: Backend
    if location.startswith(("http://", "https://")):
        from umbra.repo.backends.http import HttpBackend  # (urllib3 only when used)

        backend = HttpBackend(location, token, ca_file)
    else:
        backend = LocalBackend(location.removeprefix("file://"))
    crash_at, crash_log = testonly_int("CRASH_AT"), testonly_str("CRASH_LOG")
    if crash_at is not None or crash_log is not None:
        from umbra.repo.backends.crashpoints import CrashPoints

        backend = CrashPoints(backend, crash_at, crash_log)
    return backend
