"""Verify before write (RELIABILITY B6): a pack is read back (name, trailer, every blob decrypted,
decompressed and hashed) before it is stored, so a bit flipped in memory after sealing, or a
compressor that returns wrong output, fails the backup and stores nothing unreadable."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.engine.helpers import do_backup
from umbra.errors import PackNotVerified
from umbra.repo import crypto as crypto_module
from umbra.repo.check import check
from umbra.repo.pack import PackBuilder
from umbra.repo.repository import Repository

TRIALS = 50


def _volume(tmp_path: Path, seed: int) -> Path:
    rng = random.Random(seed)
    path = tmp_path / f"vol-{seed}.img"
    # compressible and incompressible blocks: blobs of both kinds of envelope
    path.write_bytes(
        b"".join(rng.choice([rng.randbytes(4096), bytes([rng.randrange(256)]) * 4096]) for _ in range(300))
    )
    return path


def _assert_nothing_unreadable(repo: Repository, points_before: set[str]) -> None:
    repo.invalidate_index()
    result = check(repo, read_data=True)
    assert result.ok, result.errors
    assert set(repo.point_ids()) == points_before


def test_a_bit_flipped_after_sealing_fails_the_backup_before_the_pack_is_stored(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    do_backup(repo, _volume(tmp_path, 0))  # packs that stay readable throughout
    real_finish = PackBuilder.finish
    rng = random.Random(1)
    for trial in range(TRIALS):
        flipped: list[int] = []

        def finish(self: PackBuilder, crypto: crypto_module.Crypto, flipped: list[int] = flipped) -> tuple[str, bytes]:
            pack_id, data = real_finish(self, crypto)
            if flipped:
                return pack_id, data
            at = rng.randrange(len(data))  # anywhere: magic, a blob, the trailer, the footer
            flipped.append(at)
            corrupt = bytearray(data)
            corrupt[at] ^= 1 << rng.randrange(8)
            return pack_id, bytes(corrupt)

        monkeypatch.setattr(PackBuilder, "finish", finish)
        before = set(repo.point_ids())
        with pytest.raises(PackNotVerified):
            do_backup(repo, _volume(tmp_path, 100 + trial))
        assert flipped, trial
        _assert_nothing_unreadable(repo, before)


class _WrongCompressor:
    """zstd that silently changes one byte of its input before compressing it."""

    def __init__(self) -> None:
        import zstandard

        self.real = zstandard.ZstdCompressor(level=3)

    def compress(self, data: bytes) -> bytes:
        wrong = bytearray(data)
        wrong[len(wrong) // 2] ^= 0xFF
        return bytes(self.real.compress(bytes(wrong)))


def test_a_compressor_that_returns_wrong_output_fails_the_backup(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = set(repo.point_ids())
    monkeypatch.setattr(crypto_module, "_compressor", _WrongCompressor)
    with pytest.raises(PackNotVerified, match="content does not match its id"):
        do_backup(repo, _volume(tmp_path, 2))
    monkeypatch.undo()
    _assert_nothing_unreadable(repo, before)
    do_backup(repo, _volume(tmp_path, 2))  # with a sound compressor the same backup succeeds
    assert check(repo, read_data=True).ok
