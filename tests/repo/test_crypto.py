import os

import pytest

from umbra.errors import IntegrityError
from umbra.repo.crypto import Crypto
from umbra.repo.format import BlobType


def make(encrypted: bool = True, repo_id: bytes = b"r" * 16, id_key: bytes = b"i" * 32) -> Crypto:
    return Crypto(repo_id, id_key, b"e" * 32 if encrypted else None)


@pytest.mark.parametrize("encrypted", [True, False])
@pytest.mark.parametrize("data", [b"", b"a" * 65536, os.urandom(65536)])
def test_blob_round_trip(encrypted: bool, data: bytes) -> None:
    c = make(encrypted)
    bid = c.blob_id(data)
    env = c.seal_blob(BlobType.DATA, bid, data)
    assert c.open_blob(BlobType.DATA, bid, env, 65536, "t") == data


def test_compression_only_when_it_helps() -> None:
    c = make(False)
    text, noise = b"x" * 65536, os.urandom(65536)
    assert len(c.seal_blob(BlobType.DATA, c.blob_id(text), text)) < 1000
    assert len(c.seal_blob(BlobType.DATA, c.blob_id(noise), noise)) == 65536 + 1 + 1 + 32


def test_type_confusion_and_swaps_rejected() -> None:
    c = make()
    a, b = b"A" * 100, b"B" * 100
    ea = c.seal_blob(BlobType.DATA, c.blob_id(a), a)
    with pytest.raises(IntegrityError):  # a data blob passed off as a tree node
        c.open_blob(BlobType.TREE, c.blob_id(a), ea, 65536, "t")
    with pytest.raises(IntegrityError):  # a blob answering for another id
        c.open_blob(BlobType.DATA, c.blob_id(b), ea, 65536, "t")


def test_graft_from_other_repository_rejected() -> None:
    mine, theirs = make(repo_id=b"1" * 16), make(repo_id=b"2" * 16)  # same keys, other repository
    data = b"hello"
    env = theirs.seal_blob(BlobType.DATA, theirs.blob_id(data), data)
    with pytest.raises(IntegrityError):
        mine.open_blob(BlobType.DATA, mine.blob_id(data), env, 100, "t")


@pytest.mark.parametrize("encrypted", [True, False])
def test_every_bit_flip_detected(encrypted: bool) -> None:
    c = make(encrypted)
    data = os.urandom(300)
    bid = c.blob_id(data)
    env = c.seal_blob(BlobType.DATA, bid, data)
    for bit in range(0, len(env) * 8, 7):
        bad = bytearray(env)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(IntegrityError):
            c.open_blob(BlobType.DATA, bid, bytes(bad), 1000, "t")


def test_ids_are_keyed() -> None:
    assert make(id_key=b"x" * 32).blob_id(b"data") != make(id_key=b"y" * 32).blob_id(b"data")


def test_nonces_never_repeat_and_sessions_differ() -> None:
    c = make()
    seen = set()
    for _ in range(20000):
        env = c.seal(b"x", b"aad")
        key = env[1:29]  # session id + nonce
        assert key not in seen
        seen.add(key)
    assert make().seal(b"x", b"a")[1:17] != c.seal(b"x", b"a")[1:17]


def test_decompression_bomb_refused() -> None:
    import zstandard

    c = make(False)
    data = bytes(10 * 1024 * 1024)
    bomb = zstandard.ZstdCompressor().compress(data)
    bid = c.blob_id(data)
    env = c.seal(bytes([1]) + bomb, c.blob_aad(BlobType.DATA, bid))
    with pytest.raises(IntegrityError):
        c.open_blob(BlobType.DATA, bid, env, 65536, "t")
