"""Repository parsers under hostile input (RELIABILITY H2).

Every parser of a stored object gets random and mutated input *behind* its authentication (the
bytes are sealed with the repository's own key, as a writer holding the key could): only umbra's
exception types may escape (no ``KeyError``, ``AttributeError``, ``struct.error``,
``RecursionError`` ...), and what a parser accepts has the types its users rely on.  A zstd frame
that declares a huge size is refused without allocating it.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from umbra.cow.journal import Journal
from umbra.errors import IntegrityError, UmbraError
from umbra.repo import cdp
from umbra.repo.backends import MemBackend
from umbra.repo.crypto import Crypto
from umbra.repo.format import (
    AAD_CDP,
    AAD_INDEX,
    AAD_MANIFEST,
    AAD_TRAILER,
    INDEX_MAGIC,
    PACK_FOOTER,
    PACK_MAGIC,
    BlobType,
)
from umbra.repo.index import Index, decode_index, decode_index_records
from umbra.repo.keys import parse_key_file
from umbra.repo.locks import read_locks
from umbra.repo.manifest import Point, open_point
from umbra.repo.pack import parse_trailer
from umbra.repo.repository import RepoConfig
from umbra.repo.tree import decode_node

EXAMPLES = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
CRYPTOS = {
    "none": Crypto(os.urandom(16), os.urandom(32), None),
    "aes": Crypto(os.urandom(16), os.urandom(32), os.urandom(32)),
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=25,
)

POINT_ID = "0123456789abcdef0123456789abcdef"
VALID_POINT = {
    "format": 1,
    "id": POINT_ID,
    "volume": "vol",
    "time": "2026-11-21T10:32:05.250000+00:00",
    "type": "full",
    "size": 1 << 20,
    "block_size": 65536,
    "fanout": 64,
    "root": "ab" * 32,
    "height": 1,
    "parent": None,
    "tags": [],
}


def mutations(valid: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A valid document with one field dropped, given a random value, or one added."""
    keys = st.sampled_from(sorted(valid))

    def drop(k: str) -> dict[str, Any]:
        return {x: v for x, v in valid.items() if x != k}

    return st.one_of(
        keys.map(drop),
        st.tuples(keys, json_values).map(lambda kv: {**valid, kv[0]: kv[1]}),
        st.tuples(st.text(max_size=10), json_values).map(lambda kv: {**valid, kv[0]: kv[1]}),
    )


def only_umbra_errors(parse: Callable[[], object]) -> object:
    try:
        return parse()
    except UmbraError:
        return None


def documents(valid: dict[str, Any]) -> st.SearchStrategy[bytes]:
    deep = st.integers(1, 100_000).map(lambda n: b"[" * n + b"]" * n)  # nesting past the recursion limit
    return st.one_of(
        mutations(valid).map(lambda d: json.dumps(d).encode()),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=200),
        deep,
    )


@pytest.mark.parametrize("suite", sorted(CRYPTOS))
@EXAMPLES
@given(body=documents(VALID_POINT))
def test_manifests(suite: str, body: bytes) -> None:
    crypto = CRYPTOS[suite]
    point = only_umbra_errors(lambda: open_point(crypto, POINT_ID, crypto.seal(body, AAD_MANIFEST + POINT_ID.encode())))
    if point is not None:
        assert isinstance(point, Point)
        for name, kind in (("volume", str), ("type", str), ("root", str), ("size", int), ("height", int)):
            assert isinstance(getattr(point, name), kind), name
        assert point.block_size > 0 and point.fanout >= 2 and point.size >= 0 and point.height >= 0
        assert isinstance(point.tags, list) and isinstance(point.stats, dict) and isinstance(point.cdp, dict)
        assert point.parent is None or isinstance(point.parent, str)


VALID_CONFIG = {
    "format": 1,
    "id": "00" * 16,
    "encryption": "none",
    "block_size": 65536,
    "fanout": 64,
    "pack_target": 16 << 20,
    "id_key": "00" * 32,
}


@EXAMPLES
@given(body=documents(VALID_CONFIG))
def test_config(body: bytes) -> None:
    cfg = only_umbra_errors(lambda: RepoConfig.parse(body))
    if cfg is not None:
        assert isinstance(cfg, RepoConfig)
        assert isinstance(cfg.id, str) and cfg.block_size > 0 and cfg.fanout >= 2 and cfg.pack_target > 0
        assert cfg.id_key is None or isinstance(cfg.id_key, str)


VALID_KEY = {"format": 1, "id": "ab" * 8, "repository": "00" * 16, "kdf": {"memory_kib": 1}, "wrapped": "AAAA"}


@EXAMPLES
@given(body=documents(VALID_KEY))
def test_key_files(body: bytes) -> None:
    doc = only_umbra_errors(lambda: parse_key_file(body, "keys/x"))
    if doc is not None:
        assert isinstance(doc, dict) and isinstance(doc["kdf"], dict)


@pytest.mark.parametrize("suite", sorted(CRYPTOS))
@EXAMPLES
@given(body=st.binary(max_size=400), count=st.integers(0, 2**32 - 1), prefix=st.booleans())
def test_index_files(suite: str, body: bytes, count: int, prefix: bool) -> None:
    crypto = CRYPTOS[suite]
    if prefix:  # past the magic: the entries' parser
        body = INDEX_MAGIC + struct.pack("<I", count) + body
    sealed = crypto.seal(body, AAD_INDEX)
    packs = only_umbra_errors(lambda: decode_index(crypto, sealed, "index/x"))
    records = only_umbra_errors(lambda: decode_index_records(crypto, sealed, "index/x"))
    assert (packs is None) == (records is None)
    if records is not None:  # what the repository loads: the same entries as the parsed form
        index = Index()
        for pack_id, raw in records.items():
            index.add_pack_records(pack_id, raw)
        assert index.packs() == packs


@pytest.mark.parametrize("suite", sorted(CRYPTOS))
@EXAMPLES
@given(table=st.binary(max_size=400), data_len=st.integers(0, 1 << 20), count=st.integers(0, 2**32 - 1))
def test_pack_trailers(suite: str, table: bytes, data_len: int, count: int) -> None:
    crypto = CRYPTOS[suite]
    sealed = crypto.seal(struct.pack("<I", count) + table, AAD_TRAILER)
    tail = PACK_MAGIC + bytes(min(data_len, 64)) + sealed + PACK_FOOTER.pack(len(sealed), PACK_MAGIC)
    pack_size = len(PACK_MAGIC) + data_len + len(sealed) + PACK_FOOTER.size
    entries = only_umbra_errors(lambda: parse_trailer(crypto, tail, pack_size, "data/x"))
    for e in entries or []:  # type: ignore[attr-defined]
        assert e.blob_type in (BlobType.DATA, BlobType.TREE) and e.offset + e.length <= pack_size


@EXAMPLES
@given(body=st.binary(max_size=300))
def test_tree_nodes(body: bytes) -> None:
    only_umbra_errors(lambda: decode_node(body, "tree x"))


VALID_RECORD = [7, 1_700_000_000_000_000_000, "write", 0, 4096, [["ab" * 32, 4096]]]


class _Repo:
    """What ``cdp.load_batch`` needs of a repository: its crypto and one stored object."""

    def __init__(self, crypto: Crypto, name: str, body: bytes) -> None:
        self.crypto = crypto
        self.backend = self
        self._object = crypto.seal(body, AAD_CDP + name.encode())

    def load(self, name: str) -> bytes:
        return self._object


def batch_documents() -> st.SearchStrategy[bytes]:
    valid = {"format": 1, "journal": "j" * 32, "volume": "vol", "volume_size": 1 << 20, "records": [VALID_RECORD]}
    positional = mutations(dict(enumerate(VALID_RECORD)))  # (its added keys are text: dropped)
    as_list = positional.map(lambda d: [d[k] for k in sorted(k for k in d if isinstance(k, int))])
    records = st.lists(st.one_of(st.just(VALID_RECORD), json_values, as_list), max_size=3)
    docs = st.one_of(mutations(valid), records.map(lambda r: {**valid, "records": r}), json_values)
    compressed = docs.map(lambda d: zstandard.ZstdCompressor().compress(json.dumps(d).encode()))
    return st.one_of(compressed, st.binary(max_size=200))


@pytest.mark.parametrize("suite", sorted(CRYPTOS))
@EXAMPLES
@given(body=batch_documents())
def test_journal_batches(suite: str, body: bytes) -> None:
    name = f"cdp/{'j' * 32}-{7:016d}-{7:016d}"
    ref = cdp.BatchRef(name, "j" * 32, 7, 7)
    batch = only_umbra_errors(lambda: cdp.load_batch(_Repo(CRYPTOS[suite], name, body), ref))  # type: ignore[arg-type]
    if batch is not None:
        assert isinstance(batch.volume, str) and isinstance(batch.volume_size, int)


VALID_LOCK = {"exclusive": False, "host": "h", "pid": 1, "refreshed": 1.5}


@EXAMPLES
@given(body=documents(VALID_LOCK))
def test_lock_files(body: bytes) -> None:
    """Lock files are plain JSON, not authenticated: anyone who can write the storage can plant one."""
    backend = MemBackend()
    backend.create()
    backend.store("locks/ab", body)
    only_umbra_errors(lambda: read_locks(backend))


def test_infinite_numbers_are_malformed_not_a_crash() -> None:
    """JSON's ``Infinity`` parses to a float that ``int()`` cannot take (found by the fuzzer)."""
    backend = MemBackend()
    backend.create()
    backend.store("locks/ab", b'{"exclusive":false,"host":"","pid":Infinity,"refreshed":5}')
    with pytest.raises(IntegrityError):
        read_locks(backend)
    name = f"cdp/{'j' * 32}-{7:016d}-{7:016d}"
    doc = {"format": 1, "journal": "j" * 32, "volume": "vol", "volume_size": 1 << 20, "records": [VALID_RECORD]}
    body = json.dumps(doc).replace('"records": [[7,', '"records": [[Infinity,').encode()  # the seq
    assert b"[[Infinity," in body
    repo = _Repo(CRYPTOS["aes"], name, zstandard.ZstdCompressor().compress(body))
    with pytest.raises(IntegrityError):
        cdp.load_batch(repo, cdp.BatchRef(name, "j" * 32, 7, 7))  # type: ignore[arg-type]


def test_a_zstd_bomb_is_refused_without_inflating_it() -> None:
    """256 MiB of zeros in a few KiB, with and without the size in the frame header, as a blob
    that may hold at most 1 MiB."""
    crypto = CRYPTOS["aes"]
    blob_id = crypto.blob_id(b"x")
    for with_size in (True, False):
        compressor = zstandard.ZstdCompressor(write_content_size=with_size)
        bomb = compressor.compress(bytes(256 << 20)) if with_size else _streamed(compressor, 256 << 20)
        assert len(bomb) < 64 << 10
        envelope = crypto.seal(bytes([1]) + bomb, crypto.blob_aad(BlobType.DATA, blob_id))
        with pytest.raises(UmbraError):
            crypto.open_blob(BlobType.DATA, blob_id, envelope, max_size=1 << 20, what="blob")


def _streamed(compressor: zstandard.ZstdCompressor, size: int) -> bytes:
    obj = compressor.compressobj()
    zeros = bytes(1 << 20)
    return b"".join([*(obj.compress(zeros) for _ in range(size // len(zeros))), obj.flush()])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(min_size=1, max_size=3000), at=st.integers(0, 4000))
def test_journal_segments(tmp_path_factory: pytest.TempPathFactory, garbage: bytes, at: int) -> None:
    """A segment overwritten anywhere with garbage: the journal opens (a torn tail cut) or refuses
    with JournalCorrupt, never anything else."""
    directory: Path = tmp_path_factory.mktemp("j")
    journal = Journal.open(directory, 1 << 20, segment_bytes=1 << 20)
    for i in range(20):
        journal.append_write(i * 512, bytes([i]) * (100 + i * 37))
    journal.close()
    (segment,) = directory.glob("seg-*")
    with open(segment, "r+b") as f:
        f.seek(min(at, segment.stat().st_size))
        f.write(garbage)
    reopened = only_umbra_errors(lambda: Journal.open(directory, 1 << 20))
    if reopened is not None:
        list(reopened.records())  # type: ignore[attr-defined]
        reopened.close()  # type: ignore[attr-defined]
