"""btrfs subvolumes as sources: snapshotted read-only by the btrfs provider, stored as their
``btrfs send`` stream, restored with ``btrfs receive`` to the exact files of each point."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import requires
from tests.coordinator_fixtures import btrfs_host
from umbra.engine import restore
from umbra.errors import TargetError
from umbra.repo.repository import Repository

pytestmark = [pytest.mark.root, pytest.mark.loopdev]


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Path]:
    requires("loop", "mkfs.btrfs")
    with btrfs_host(tmp_path) as mnt:
        yield mnt


def tree_state(root: Path) -> dict[str, object]:
    """Every entry below ``root``: kind, mode, content digest or link target, xattrs."""
    out: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        st = path.lstat()
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            out[rel] = ("dir", oct(st.st_mode))
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            xattrs = {name: os.getxattr(path, name).hex() for name in os.listxattr(path)}
            out[rel] = ("file", oct(st.st_mode), digest, st.st_nlink, xattrs)
    return out


def umbra(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "umbra", *args], env=env, capture_output=True, text=True)


def test_subvolume_backup_and_receive(pool: Path, tmp_path: Path) -> None:
    env = {**os.environ, "UMBRA_REPO": str(tmp_path / "repo"), "UMBRA_PASSWORD": "secret"}
    assert umbra(env, "init").returncode == 0
    sub = pool / "data"
    subprocess.run(["btrfs", "subvolume", "create", str(sub)], check=True, capture_output=True)
    (sub / "docs").mkdir()
    (sub / "docs" / "a.txt").write_text("first version\n")
    (sub / "big.bin").write_bytes(os.urandom(3 << 20))
    (sub / "empty").write_bytes(b"")
    os.symlink("docs/a.txt", sub / "link")
    os.link(sub / "big.bin", sub / "hard.bin")
    os.setxattr(sub / "docs" / "a.txt", "user.tag", b"kept")
    os.chmod(sub / "docs" / "a.txt", 0o640)
    states = [tree_state(sub)]
    first = umbra(env, "backup", str(sub), "-v", "data", "--json")
    assert first.returncode == 0, first.stderr

    (sub / "docs" / "a.txt").write_text("second version\n")
    (sub / "new.txt").write_text("added\n")
    (sub / "empty").unlink()
    states.append(tree_state(sub))
    second = umbra(env, "backup", str(sub), "-v", "data", "-t", "incremental", "--json")
    assert second.returncode == 0, second.stderr
    assert not list(pool.glob(".umbra-snapshot-*")), "the snapshots were deleted after the backups"

    listing = json.loads(umbra(env, "list", "--json").stdout)
    assert [p["content"] for p in listing] == ["btrfs-send", "btrfs-send"]
    assert [p["provider"] for p in listing] == ["btrfs", "btrfs"]
    unchanged = umbra(env, "backup", str(sub), "-v", "data", "-t", "incremental", "--json")
    assert unchanged.returncode == 0, unchanged.stderr
    stats = json.loads(unchanged.stdout)["results"][0]["stats"]
    assert stats["bytes_new"] < stats["bytes_read"] / 4, f"an unchanged subvolume mostly dedups: {stats}"

    verified = umbra(env, "verify", listing[0]["id"], "--json")
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["filesystem"] == "btrfs-send" and json.loads(verified.stdout)["clean"]
    ls = umbra(env, "ls", listing[0]["id"])
    assert ls.returncode == 61 and "send stream" in ls.stderr, ls.stderr
    for k, point in enumerate(listing):
        into = pool / f"restored-{k}"
        into.mkdir()
        out = umbra(env, "restore", point["id"], str(into))
        assert out.returncode == 0, out.stderr
        received = into / "data"
        assert tree_state(received) == states[k], f"point {k} restored exactly"
        assert (
            subprocess.run(
                ["btrfs", "property", "get", str(received), "ro"], capture_output=True, text=True
            ).stdout.strip()
            == "ro=true"
        )


def test_restore_needs_a_btrfs_directory(pool: Path, repo: Repository, tmp_path: Path) -> None:
    from umbra.coordinator.snapshot_set import SetOptions
    from umbra.engine import backup_set

    sub = pool / "small"
    subprocess.run(["btrfs", "subvolume", "create", str(sub)], check=True, capture_output=True)
    (sub / "x").write_text("x")
    (result,) = backup_set.run(repo, backup_set.SetBackupOptions([str(sub)], ["small"], set_options=SetOptions()), [])
    elsewhere = tmp_path / "not-btrfs"
    elsewhere.mkdir()
    with pytest.raises(TargetError, match="restores into a directory on btrfs"):
        restore.run(repo, result.point, str(elsewhere))


class BytesView:
    def __init__(self, data: bytes) -> None:
        self.data, self.size = data, len(data)

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]


def test_verify_finds_a_damaged_stream(pool: Path, repo: Repository) -> None:
    from umbra.coordinator.snapshot_set import SetOptions
    from umbra.engine import backup_set
    from umbra.engine.verify import _verify_send_stream
    from umbra.repo.view import PointView

    sub = pool / "v"
    subprocess.run(["btrfs", "subvolume", "create", str(sub)], check=True, capture_output=True)
    (sub / "f").write_bytes(os.urandom(200_000))
    (result,) = backup_set.run(repo, backup_set.SetBackupOptions([str(sub)], ["v"], set_options=SetOptions()), [])
    stream = PointView(repo, result.point).read(0, result.point.size)
    assert stream.startswith(b"btrfs-stream\0")
    assert _verify_send_stream(result.point, BytesView(stream), "v").clean  # type: ignore[arg-type]
    damaged = bytearray(stream)
    damaged[len(damaged) // 2] ^= 0xFF
    bad = _verify_send_stream(result.point, BytesView(bytes(damaged)), "v")  # type: ignore[arg-type]
    assert not bad.clean and bad.steps[0]["exit_code"] != 0, bad.steps
