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


def test_a_session_ends_before_its_key_would_encrypt_too_much(monkeypatch: pytest.MonkeyPatch) -> None:
    """RELIABILITY E2: no key encrypts more than the session limit (2**32 in use; 5 here), and
    every envelope still opens."""
    from umbra.repo import crypto

    monkeypatch.setattr(crypto, "_MAX_NONCES_PER_SESSION", 5)
    c = make()
    envelopes = [c.seal(bytes([i]), b"aad") for i in range(12)]
    sessions = [env[1:17] for env in envelopes]
    assert [sessions.count(s) for s in dict.fromkeys(sessions)] == [5, 5, 2]
    assert [int.from_bytes(env[17:29], "little") for env in envelopes] == [0, 1, 2, 3, 4] * 2 + [0, 1]
    assert [c.open(env, b"aad", "t") for env in envelopes] == [bytes([i]) for i in range(12)]


@pytest.mark.slow
def test_a_million_encryptions_never_repeat_a_key_and_nonce() -> None:
    """RELIABILITY E2 at its stated count, from four threads at once."""
    from concurrent.futures import ThreadPoolExecutor

    c = make()

    def seal_many(_: int) -> list[bytes]:
        return [c.seal(b"", b"a")[1:29] for _ in range(250_000)]

    with ThreadPoolExecutor(4) as pool:
        pairs = [pair for batch in pool.map(seal_many, range(4)) for pair in batch]
    assert len(pairs) == len(set(pairs)) == 1_000_000
