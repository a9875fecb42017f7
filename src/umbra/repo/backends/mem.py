"""An in-memory backend: a real implementation of the contract, for fast tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from umbra.errors import RepositoryExists
from umbra.repo.backends.base import DIRECTORIES, Backend, ObjectMissing, validate_name


class MemBackend(Backend):
    def __init__(self) -> None:
        self.location = "mem:"
        self.objects: dict[str, bytes] = {}
        self.created = False
        self._lock = threading.Lock()

    def exists(self) -> bool:
        return "config" in self.objects

    def create(self) -> None:
        if self.objects:
            raise RepositoryExists(location=self.location)
        self.created = True

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        try:
            data = self.objects[validate_name(name)]
        except KeyError:
            raise ObjectMissing(name=name) from None
        end = None if length is None else offset + length
        return data[offset:end]

    def store(self, name: str, data: bytes, replace: bool = False) -> None:
        with self._lock:
            if not replace and validate_name(name) in self.objects:
                raise FileExistsError(name)
            self.objects[name] = bytes(data)

    def delete(self, name: str) -> None:
        with self._lock:
            if self.objects.pop(validate_name(name), None) is None:
                raise ObjectMissing(name=name)

    def size(self, name: str) -> int:
        return len(self.load(name))

    def list(self, directory: str) -> Iterator[str]:
        assert directory in DIRECTORIES
        with self._lock:
            names = sorted(n for n in self.objects if n.startswith(directory + "/"))
        yield from names
