"""Detection of corruption (RELIABILITY B1, B2, B3): never silently wrong bytes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.engine.helpers import do_backup, restored, sha
from umbra.engine import restore
from umbra.errors import IntegrityError
from umbra.repo.check import check
from umbra.repo.index import decode_index, encode_index
from umbra.repo.repository import Repository


@pytest.fixture
def two_points(repo: Repository, tmp_path: Path) -> tuple[Repository, Path, Path]:
    rng = random.Random(5)
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(rng.randbytes(600_000))
    b.write_bytes(rng.randbytes(600_000))
    do_backup(repo, a, volume="a")
    do_backup(repo, b, volume="b")
    assert check(repo, read_data=True).ok
    return repo, a, b


def packs_of(repo: Repository, volume: str) -> list[str]:
    point = repo.resolve(f"{volume}@latest")
    from umbra.engine.diff import tree_reader

    return sorted({repo.locate(bid).pack_id for _, bid in tree_reader(repo, point).blocks()})


def pack_path(repo_dir: Path, pack_id: str) -> Path:
    return repo_dir / "data" / pack_id[:2] / pack_id


def test_flipped_bit_in_pack_found_by_read_data_and_restore(
    two_points: tuple[Repository, Path, Path], tmp_path: Path
) -> None:
    repo, _, b = two_points
    victim = pack_path(tmp_path / "repo", packs_of(repo, "a")[0])
    data = bytearray(victim.read_bytes())
    data[100] ^= 0x10
    victim.write_bytes(bytes(data))
    result = check(repo, read_data=True)
    assert not result.ok
    assert any(victim.name[:16] in e and "offset" in e for e in result.errors), result.errors
    with pytest.raises(IntegrityError, match="pack"):
        restore.run(repo, repo.resolve("a@latest"), str(tmp_path / "bad.img"))
    # untouched points still restore
    assert victim.name not in packs_of(repo, "b")
    assert sha(restored(repo, repo.resolve("b@latest"), tmp_path / "b2.img")) == sha(b)


@pytest.mark.parametrize("damage", ["empty", "one-byte", "truncated", "deleted"])
def test_damaged_packs_all_reported(two_points: tuple[Repository, Path, Path], tmp_path: Path, damage: str) -> None:
    repo, a, _ = two_points
    victims = [pack_path(tmp_path / "repo", p) for p in packs_of(repo, "a")[:2] + packs_of(repo, "b")[:1]]
    for v in victims:
        size = v.stat().st_size
        if damage == "deleted":
            v.unlink()
        else:
            v.write_bytes(v.read_bytes()[: {"empty": 0, "one-byte": 1, "truncated": size - 1}[damage]])
    result = check(repo)
    assert not result.ok
    for v in victims:
        assert any(v.name in e for e in result.errors), (v.name, result.errors)
    if damage == "truncated":  # only the footer is gone: the blobs are intact and verified
        assert sha(restored(repo, repo.resolve("a@latest"), tmp_path / "x.img")) == sha(a)
    else:
        with pytest.raises(IntegrityError):
            restore.run(repo, repo.resolve("a@latest"), str(tmp_path / "x.img"))


def test_damaged_and_missing_index_and_manifest(two_points: tuple[Repository, Path, Path], tmp_path: Path) -> None:
    repo, _, _ = two_points
    root = tmp_path / "repo"
    manifests = sorted((root / "points").iterdir())
    manifests[0].write_bytes(manifests[0].read_bytes()[:-1])
    for f in (root / "index").iterdir():
        f.unlink()
    result = check(repo)
    text = "\n".join(result.errors)
    assert manifests[0].name in text
    assert "referenced but not in the index" in text or "referenced but not stored" in text
    assert any("not indexed" in w for w in result.warnings)


def test_swapped_blobs_rejected_by_authentication(two_points: tuple[Repository, Path, Path], tmp_path: Path) -> None:
    """Swap two blobs' index entries (B3): the envelope binds the id, so each fails to open."""
    repo, _, _ = two_points
    root = tmp_path / "repo"
    (index_file,) = list((root / "index").iterdir())[:1]
    packs = decode_index(repo.crypto, index_file.read_bytes(), "t")
    pack_id = next(p for p, entries in packs.items() if len(entries) >= 2)
    e = packs[pack_id]
    from umbra.repo.pack import PackEntry

    e[0], e[1] = (
        PackEntry(e[0].blob_type, e[0].blob_id, e[1].offset, e[1].length),
        PackEntry(e[1].blob_type, e[1].blob_id, e[0].offset, e[0].length),
    )
    for f in (root / "index").iterdir():
        f.unlink()
    new_id, data = encode_index(repo.crypto, packs)
    (root / "index" / new_id).write_bytes(data)
    repo.invalidate_index()
    result = check(repo, read_data=True)
    assert not result.ok
    assert any("authentication failed" in x or "not in its trailer" in x for x in result.errors)
