"""``ls`` and ``extract``: files read out of an image point without mounting it, compared with the
tree the image was made from (``mkfs.ext4 -d``), and hostile images (RELIABILITY G1)."""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import requires
from tests.engine.helpers import assert_same_tree, do_backup, special_tree
from umbra.engine import files
from umbra.errors import ExtractError, FileSystemError
from umbra.repo.backends import LocalBackend
from umbra.repo.repository import Repository
from umbra.testing.volumes import debugfs, make_ext4

MiB = 1 << 20


@pytest.fixture
def image_point(tmp_path: Path) -> tuple[Repository, object, Path]:
    requires("mkfs.ext4")
    tree = special_tree(tmp_path / "tree")
    image = make_ext4(tmp_path / "fs.img", 64 * MiB, tree, garbage=False)
    repo = Repository.init(LocalBackend(tmp_path / "repo"), "secret")
    return repo, do_backup(repo, image, volume="fs"), tree


def test_extract_everything_equals_the_source_tree(image_point, tmp_path: Path) -> None:
    repo, point, tree = image_point
    _, _, fs = files.open_filesystem(repo, point.id)
    result = files.extract(fs, "/", str(tmp_path / "out"))
    assert_same_tree(tree, tmp_path / "out", owners=os.geteuid() == 0)
    assert result.counts["hard links"] == 1 and result.counts["symlinks"] == 4
    assert os.stat(tmp_path / "out" / "sparse.img").st_blocks * 512 < 64 * 1024  # holes stay holes


def test_extract_one_file_and_one_directory(image_point, tmp_path: Path) -> None:
    repo, point, tree = image_point
    _, _, fs = files.open_filesystem(repo, point.id)
    files.extract(fs, "/dir/sub", str(tmp_path / "a"))
    assert (tmp_path / "a" / "sub" / "deeper" / "nested.bin").read_bytes() == (
        tree / "dir" / "sub" / "deeper" / "nested.bin"
    ).read_bytes()
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "sub").st_mode) == 0o750
    files.extract(fs, "/random.bin", str(tmp_path / "b"))
    assert (tmp_path / "b" / "random.bin").read_bytes() == (tree / "random.bin").read_bytes()
    with pytest.raises(ExtractError, match="exists"):
        files.extract(fs, "/random.bin", str(tmp_path / "b"))  # never overwrites
    with pytest.raises(FileSystemError, match="no such file"):
        files.extract(fs, "/nope", str(tmp_path / "c"))


def test_extract_reads_only_the_blocks_it_needs(tmp_path: Path) -> None:
    requires("mkfs.ext4")
    tree = tmp_path / "tree"
    tree.mkdir()
    rng = random.Random(1)
    for i in range(12):
        (tree / f"big{i}.bin").write_bytes(rng.randbytes(4 * MiB))
    (tree / "small.txt").write_bytes(b"needle" * 1000)
    image = make_ext4(tmp_path / "fs.img", 128 * MiB, tree, garbage=False)
    repo = Repository.init(LocalBackend(tmp_path / "repo"), "secret")
    point = do_backup(repo, image, volume="fs")
    _, view, fs = files.open_filesystem(repo, point.id)
    files.extract(fs, "/small.txt", str(tmp_path / "out"))
    assert (tmp_path / "out" / "small.txt").read_bytes() == b"needle" * 1000
    assert view.bytes_fetched < 0.01 * point.size, view.bytes_fetched


def test_ls_lists_names_types_and_targets(image_point) -> None:
    repo, point, tree = image_point
    _, _, fs = files.open_filesystem(repo, point.id)
    top = {e.name.decode(): e for e in fs.children(fs.root())}
    assert set(top) == {p.name for p in tree.iterdir()} | {"lost+found"}
    assert top["fifo"].kind == "fifo" and top["abs-link"].link_target == b"/etc/hostname"
    assert top["long-link"].link_target == b"t" * 200
    assert top["setuid"].mode == 0o4755 and top["plain.txt"].size == 12
    everything = [e.path for e in files.walk(fs, fs.root())]
    assert b"/dir/sub/deeper/nested.bin" in everything


def umbra(*args: str, repo: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, UMBRA_REPO=str(repo), UMBRA_PASSWORD="secret")
    return subprocess.run([sys.executable, "-m", "umbra", *args], capture_output=True, text=True, env=env, timeout=120)


def test_cli_ls_and_extract(image_point, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    proc = umbra("ls", "fs@latest", "/dir", "--json", repo=repo)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["filesystem"] == "ext4"
    assert {e["name"]: e["type"] for e in doc["entries"]} == {
        "sub": "dir",
        "hardlink.txt": "file",
        "rel-link": "symlink",
    }
    proc = umbra("ls", "fs@latest", "-R", repo=repo)
    assert "/dir/sub/deeper/nested.bin" in proc.stdout and "-> ../plain.txt" in proc.stdout
    proc = umbra("extract", "fs@latest", "/plain.txt", str(tmp_path / "x"), "--json", repo=repo)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["counts"] == {"files": 1}
    assert (tmp_path / "x" / "plain.txt").read_text() == "hello umbra\n"
    proc = umbra("extract", "fs@latest", "/plain.txt", str(tmp_path / "x"), repo=repo)
    assert proc.returncode == 62 and "exists" in proc.stderr and "Traceback" not in proc.stderr
    proc = umbra("ls", "fs@latest", "/missing", repo=repo)
    assert proc.returncode == 61 and "no such file" in proc.stderr


def test_no_filesystem_is_a_clear_error(tmp_path: Path) -> None:
    vol = tmp_path / "raw.img"
    vol.write_bytes(random.Random(3).randbytes(2 * MiB))
    repo = Repository.init(LocalBackend(tmp_path / "repo"), "secret")
    do_backup(repo, vol, volume="raw")
    proc = umbra("ls", "raw@latest", repo=tmp_path / "repo")
    assert proc.returncode == 61 and "no filesystem" in proc.stderr


# --- hostile images (G1): nothing may be written outside DEST ------------------------------------


def patch_name(image: Path, old: bytes, new: bytes) -> None:
    """Rewrite a directory entry's name in place (same length; ext4 checksums are not checked by the reader)."""
    assert len(old) == len(new)
    data = bytearray(image.read_bytes())
    at = data.find(old)
    assert at >= 0
    while at >= 0:
        data[at : at + len(old)] = new
        at = data.find(old, at + 1)
    image.write_bytes(bytes(data))


def test_hostile_names_and_symlink_tricks_stay_inside_dest(tmp_path: Path) -> None:
    requires("mkfs.ext4", "debugfs")
    outside = tmp_path / "outside"
    outside.mkdir()
    tree = tmp_path / "tree"
    (tree / "QQQQ").mkdir(parents=True)
    (tree / "QQQQ" / "victim").write_text("written through a symlink")
    os.symlink(str(outside), tree / "ZZZZ")  # a symlink to a directory outside DEST
    (tree / "SLASHNAME").write_text("a name with a slash")
    (tree / "DD").write_text("a name that is ..")
    (tree / "loopdir" / "sub").mkdir(parents=True)
    image = make_ext4(tmp_path / "fs.img", 16 * MiB, tree, garbage=False)
    debugfs(image, "link /loopdir /loopdir/sub/back")  # a directory loop (before checksums break)
    patch_name(image, b"QQQQ", b"ZZZZ")  # a directory named like the symlink: extract must not follow it
    patch_name(image, b"SLASHNAME", b"../../esc")
    patch_name(image, b"DD\x00", b"..\x00")
    repo = Repository.init(LocalBackend(tmp_path / "repo"), "secret")
    point = do_backup(repo, image, volume="fs")
    _, _, fs = files.open_filesystem(repo, point.id)
    dest = tmp_path / "dest" / "inner"
    result = files.extract(fs, "/", str(dest))
    warnings = "\n".join(result.warnings)
    assert "unsafe name b'../../esc'" in warnings  # (an entry named ".." is never even listed)
    assert "second entry named b'ZZZZ'" in warnings and "directory loop" in warnings
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "esc").exists() and not (tmp_path / "dest" / "esc").exists()
    for path in dest.rglob("*"):
        assert os.path.realpath(path.parent).startswith(str(dest)), path


@pytest.mark.root
def test_extract_onto_a_full_disk_is_one_clear_error(image_point, tmp_path: Path) -> None:
    requires("root")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "none", str(small)], check=True)
    try:
        proc = umbra("extract", "fs@latest", "/", str(small / "out"), repo=tmp_path / "repo")
    finally:
        subprocess.run(["umount", str(small)], check=True)
    assert proc.returncode == ExtractError.exit_code, proc.stderr
    assert "No space left on device" in proc.stderr and "Traceback" not in proc.stderr
