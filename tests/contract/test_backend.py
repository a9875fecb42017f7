"""The Backend contract, run over every implementation (mem, local, a backup server over HTTP)."""

import pytest

from umbra.errors import ObjectMissing
from umbra.repo.backends.base import Backend, validate_name


def test_store_load_ranges(backend: Backend) -> None:
    backend.create()
    backend.store("index/ab01", b"0123456789")
    assert backend.load("index/ab01") == b"0123456789"
    assert backend.load("index/ab01", 2, 3) == b"234"
    assert backend.load("index/ab01", 8, 10) == b"89"
    assert backend.size("index/ab01") == 10
    assert list(backend.list("index")) == ["index/ab01"]


def test_no_silent_overwrite(backend: Backend) -> None:
    backend.create()
    backend.store("points/aa", b"one")
    with pytest.raises(FileExistsError):
        backend.store("points/aa", b"two")
    assert backend.load("points/aa") == b"one"
    backend.store("points/aa", b"two", replace=True)
    assert backend.load("points/aa") == b"two"


def test_missing(backend: Backend) -> None:
    backend.create()
    with pytest.raises(ObjectMissing):
        backend.load("points/00")
    with pytest.raises(ObjectMissing):
        backend.delete("points/00")
    with pytest.raises(ObjectMissing):
        backend.size("points/00")


def test_list_and_delete(backend: Backend) -> None:
    backend.create()
    names = ["data/ab/ab01", "data/cd/cd02", "data/ab/ab03"]
    for n in names:
        backend.store(n, b"x")
    assert sorted(backend.list("data")) == sorted(names)
    backend.delete("data/ab/ab01")
    assert sorted(backend.list("data")) == ["data/ab/ab03", "data/cd/cd02"]


@pytest.mark.parametrize("name", ["../x", "data/ab", "points/../../etc", "/abs", "keys/ABC", "data/zz/zz1", ""])
def test_bad_names_rejected(name: str, backend: Backend) -> None:
    with pytest.raises(ValueError):
        validate_name(name)
    with pytest.raises(ValueError):
        backend.store(name, b"x")
