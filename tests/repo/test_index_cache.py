"""The local index cache: a second load reads no index file it holds, later index files are added
on top, a rewritten index rebuilds it, and a damaged or forged cache is never trusted."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from umbra.repo.backends import LocalBackend
from umbra.repo.backends.base import Backend, ForwardingBackend
from umbra.repo.format import BlobType
from umbra.repo.index import Index, encode_index
from umbra.repo.index_cache import IndexCache
from umbra.repo.pack import PackEntry
from umbra.repo.repository import Repository


class CountingBackend(ForwardingBackend):
    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.loaded: list[str] = []

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        self.loaded.append(name)
        return self.inner.load(name, offset, length)


def add_index_file(repo: Repository, blobs: int) -> str:
    pack_id = os.urandom(32).hex()
    entries = [PackEntry(BlobType.DATA, os.urandom(32), i * 100, 100) for i in range(blobs)]
    name, data = encode_index(repo.crypto, {pack_id: entries})
    repo.store_content_addressed(f"index/{name}", data)
    return f"index/{name}"


def reopened(path: Path) -> tuple[Repository, CountingBackend]:
    backend = CountingBackend(LocalBackend(path))
    return Repository.open(backend, "secret"), backend


def same(a: Index, b: Index) -> bool:
    return dict(a.items()) == dict(b.items()) and len(a) == len(b)


def cache_path(repo: Repository) -> Path:
    cache = repo.index_cache()
    assert cache is not None
    return cache.path


def fresh(repo: Repository) -> Index:
    return repo.load_index(pack_lists=True)  # (never through the cache)


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    repo = Repository.init(LocalBackend(tmp_path / "repo"), "secret")
    for blobs in (3000, 10, 1):
        add_index_file(repo, blobs)
    return tmp_path / "repo"


def test_a_second_load_reads_no_index_file(repo_dir: Path) -> None:
    repo, backend = reopened(repo_dir)
    first = repo.load_index()
    assert len([n for n in backend.loaded if n.startswith("index/")]) == 3
    assert cache_path(repo).exists()
    repo, backend = reopened(repo_dir)
    second = repo.load_index()
    assert [n for n in backend.loaded if n.startswith("index/")] == []
    assert same(second, first) and same(second, fresh(repo))
    blob_id, location = next(iter(first.items()))
    assert second.get(blob_id) == location


def test_later_index_files_are_read_on_top_and_cached(repo_dir: Path) -> None:
    repo, _ = reopened(repo_dir)
    repo.load_index()
    added = add_index_file(repo, 50)
    repo, backend = reopened(repo_dir)
    index = repo.load_index()
    assert [n for n in backend.loaded if n.startswith("index/")] == [added]
    assert same(index, fresh(repo)) and len(index) == 3061
    repo, backend = reopened(repo_dir)
    assert same(repo.load_index(), index)
    assert [n for n in backend.loaded if n.startswith("index/")] == []


def test_a_rewritten_index_rebuilds_the_cache(repo_dir: Path) -> None:
    repo, _ = reopened(repo_dir)
    repo.load_index()
    gone = sorted(repo.backend.list("index"))[0]
    repo.backend.delete(gone)  # as prune or compact do when they rewrite the index
    repo, backend = reopened(repo_dir)
    index = repo.load_index()
    assert len([n for n in backend.loaded if n.startswith("index/")]) == 2
    assert same(index, fresh(repo))


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign key"])
def test_a_damaged_or_forged_cache_is_ignored(repo_dir: Path, tmp_path: Path, damage: str, caplog) -> None:  # type: ignore[no-untyped-def]
    repo, _ = reopened(repo_dir)
    truth = repo.load_index()
    path = cache_path(repo)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40  # a blob location in the table
        path.write_bytes(data)
    elif damage == "truncate":
        path.write_bytes(data[:-1])
    else:  # a cache of another repository that has this one's id, written under its own key
        other = Repository.init(LocalBackend(tmp_path / "other"), "other secret")
        IndexCache(path.parent.parent, repo.config.id, other.crypto).save(sorted(repo.backend.list("index")), Index())
    caplog.set_level(logging.WARNING)
    repo, backend = reopened(repo_dir)
    index = repo.load_index()
    assert len([n for n in backend.loaded if n.startswith("index/")]) == 3  # read from the repository
    assert same(index, truth)
    if damage != "truncate":
        assert "does not verify" in caplog.text
    repo, backend = reopened(repo_dir)
    assert same(repo.load_index(), truth)
    assert [n for n in backend.loaded if n.startswith("index/")] == []  # written again, and good


def test_an_unwritable_cache_directory_only_costs_the_cache(
    repo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("UMBRA_CACHE_DIR", str(blocker))
    repo, _ = reopened(repo_dir)
    assert same(repo.load_index(), fresh(repo))
    assert not cache_path(repo).exists()


def test_only_a_hexadecimal_repository_id_names_a_cache_directory(tmp_path: Path) -> None:
    crypto = Repository.init(LocalBackend(tmp_path / "repo"), "secret").crypto
    for bad in ("../../etc", "ABCDEF0123456789", "", "a" * 15):
        with pytest.raises(ValueError):
            IndexCache(tmp_path, bad, crypto)
    assert IndexCache(tmp_path, "0123456789abcdef", crypto).path == tmp_path / "0123456789abcdef" / "index.cache"
