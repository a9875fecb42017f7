"""``umbra export`` (a point as an NBD disk, read-only or with an overlay) and ``umbra mount`` (a point
as a FUSE image file, or its files), against qemu-img, qemu-io, nbdinfo, nbdcopy and a read-only
loop mount."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import requires
from tests.engine.helpers import assert_same_tree, do_backup, restored, special_tree, write_at
from umbra.frontends.exports import OverlayExport, RestoringExport
from umbra.repo.backends import LocalBackend
from umbra.repo.repository import Repository
from umbra.testing.volumes import make_ext4, make_tree
from umbra.volume.sink import open_target

MiB = 1 << 20


def umbra(*args: str, repo: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, UMBRA_REPO=str(repo), UMBRA_PASSWORD="secret")
    proc = subprocess.run([sys.executable, "-m", "umbra", *args], capture_output=True, text=True, env=env, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


class Running:
    """An ``umbra export`` or ``umbra mount`` process, ready once ``ready_path`` exists."""

    def __init__(self, args: list[str], repo: Path, ready_path: Path, log: Path) -> None:
        env = dict(os.environ, UMBRA_REPO=str(repo), UMBRA_PASSWORD="secret")
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "umbra", *args], stdout=out, stderr=subprocess.STDOUT, env=env
            )
        deadline = time.monotonic() + 60
        while not ready_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"did not start: {log.read_text()}")
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def child_pids(pid: int) -> list[int]:
    return [int(n) for task in Path(f"/proc/{pid}/task").iterdir() for n in (task / "children").read_text().split()]


def run(*args: str) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture
def points(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A repository with two points of an 8 MiB volume; the restores of both."""
    repo_dir = tmp_path / "repo"
    repo = Repository.init(LocalBackend(repo_dir), "secret", block_size=64 * 1024)
    vol = tmp_path / "vol.img"
    with open(vol, "wb") as f:
        f.truncate(8 * MiB)
    write_at(vol, 0, os.urandom(MiB))
    write_at(vol, 5 * MiB + 123, b"first point" * 1000)
    first = do_backup(repo, vol, all_blocks=True)
    write_at(vol, 5 * MiB, b"\x07" * MiB)
    do_backup(repo, vol, type_="incremental", all_blocks=True)
    yield repo_dir, restored(repo, first, tmp_path / "first.img")


def test_export_serves_an_older_point_to_real_clients(points: tuple[Path, Path], tmp_path: Path) -> None:
    requires("qemu-img", "nbdinfo", "nbdcopy")
    repo, first = points
    sock = tmp_path / "nbd.sock"
    first_id = json.loads(umbra("list", "--json", repo=repo).stdout)[0]["id"]
    served = Running(["export", first_id[:10], "--nbd", f"unix:{sock}", "--name", "disk"], repo, sock, tmp_path / "l")
    try:
        uri = f"nbd+unix:///disk?socket={sock}"
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(first), uri)
        run("nbdcopy", "--connections=4", uri, str(tmp_path / "copy.img"))
        assert (tmp_path / "copy.img").read_bytes() == first.read_bytes()
        extents = json.loads(run("nbdinfo", "--map", "--json", uri))
        holes = [(e["offset"], e["length"]) for e in extents if e["type"] & 1]
        assert (MiB, 4 * MiB) in holes  # never-written blocks are reported as holes
        assert "serving point" in tmp_path.joinpath("l").read_text()
    finally:
        assert served.stop() == 0


def test_writable_export_keeps_writes_in_the_overlay_only(points: tuple[Path, Path], tmp_path: Path) -> None:
    requires("qemu-io", "qemu-img")
    repo, _ = points
    latest = tmp_path / "latest.img"
    umbra("restore", "v@latest", str(latest), repo=repo)
    sock, overlay = tmp_path / "nbd.sock", tmp_path / "overlay"
    args = ["export", "v@latest", "--nbd", f"unix:{sock}", "--writable", "--overlay", str(overlay)]
    served = Running(args, repo, sock, tmp_path / "w.log")
    uri = f"nbd+unix:///v?socket={sock}"
    try:
        out = run(
            "qemu-io", "-f", "raw", uri,
            "-c", "write -P 0xab 1000 70000",  # unaligned: edge pages come from the point
            "-c", "read -P 0xab 1000 70000",
            "-c", "write -z 6M 64k",
        )  # fmt: skip
        assert "read 70000/70000" in out
        expected = bytearray(latest.read_bytes())
        expected[1000:71000] = b"\xab" * 70000
        expected[6 * MiB : 6 * MiB + 65536] = bytes(65536)
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(tmp_path / "now.img"))
        assert (tmp_path / "now.img").read_bytes() == bytes(expected)
    finally:
        assert served.stop() == 0
    assert overlay.exists()  # --overlay is kept
    served = Running(["export", "v@latest", "--nbd", f"unix:{sock}"], repo, sock, tmp_path / "r.log")
    try:
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(latest), uri)  # the point is unchanged
        proc = subprocess.run(["qemu-io", "-f", "raw", uri, "-c", "write 0 4k"], capture_output=True, text=True)
        assert proc.returncode != 0 or "failed" in proc.stdout + proc.stderr
    finally:
        served.stop()


def test_export_errors_are_clear(points: tuple[Path, Path], tmp_path: Path) -> None:
    repo, _ = points
    proc = umbra("export", "v@latest", "--overlay", str(tmp_path / "o"), repo=repo, check=False)
    assert proc.returncode == 5 and "--writable" in proc.stderr
    (tmp_path / "exists").write_bytes(b"x")
    args = ["export", "v@latest", "--writable", "--overlay", str(tmp_path / "exists"), "--nbd", "unix:/nonexistent/s"]
    proc = umbra(*args, repo=repo, check=False)
    assert proc.returncode == 5 and "already exists" in proc.stderr
    proc = umbra("export", "v@latest", "--nbd", "unix:/nonexistent/dir/sock", repo=repo, check=False)
    assert proc.returncode == 60 and "cannot serve NBD" in proc.stderr and "Traceback" not in proc.stderr
    proc = umbra("export", "nosuch@latest", repo=repo, check=False)
    assert proc.returncode == 23
    proc = umbra("mount", "v@latest", str(tmp_path / "missing-dir"), repo=repo, check=False)
    assert proc.returncode == 5 and "not a directory" in proc.stderr


def test_mount_holds_a_shared_lock(points: tuple[Path, Path], tmp_path: Path) -> None:
    """While a point is served, prune cannot remove its data."""
    requires("root")
    repo, _ = points
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = Running(["mount", "v@latest", str(mnt)], repo, mnt / "v.img", tmp_path / "m.log")
    try:
        proc = umbra("prune", "--keep-last", "1", repo=repo, check=False)
        assert proc.returncode == 13, proc.stderr  # RepositoryLocked
    finally:
        assert mounted.stop() == 0
    assert not (mnt / "v.img").exists()  # unmounted on SIGTERM


@pytest.mark.root
@pytest.mark.loopdev
def test_mount_image_file_loop_mounts_read_only(tmp_path: Path) -> None:
    requires("root", "loop", "mkfs.ext4")
    tree = make_tree(tmp_path / "tree", seed=4, files=20)
    image = make_ext4(tmp_path / "fs.img", 48 * MiB, tree)
    repo_dir = tmp_path / "repo"
    repo = Repository.init(LocalBackend(repo_dir), "secret")
    point = do_backup(repo, image, volume="fs")
    full = restored(repo, point, tmp_path / "restored.img")
    mnt, fs = tmp_path / "mnt", tmp_path / "fs"
    mnt.mkdir()
    fs.mkdir()
    mounted = Running(["mount", "fs@latest", str(mnt)], repo_dir, mnt / "fs.img", tmp_path / "m.log")
    try:
        assert (mnt / "fs.img").stat().st_size == 48 * MiB
        run("cmp", str(mnt / "fs.img"), str(full))
        run("mount", "-o", "ro,loop", str(mnt / "fs.img"), str(fs))
        try:
            for f in tree.rglob("*"):
                if f.is_file():
                    assert (fs / f.relative_to(tree)).read_bytes() == f.read_bytes()
        finally:
            run("umount", str(fs))
        with pytest.raises(OSError):
            open(mnt / "fs.img", "r+b").close()  # read-only
        run("umount", str(mnt))  # unmounting from outside ends the command
        assert mounted.proc.wait(30) == 0
    finally:
        mounted.stop()


def test_mount_files_shows_the_tree_without_a_loop_device(tmp_path: Path) -> None:
    requires("root", "mkfs.ext4")  # FUSE mounts need root (or fusermount3) here
    tree = special_tree(tmp_path / "tree")
    image = make_ext4(tmp_path / "fs.img", 32 * MiB, tree, garbage=False)
    repo_dir = tmp_path / "repo"
    do_backup(Repository.init(LocalBackend(repo_dir), "secret"), image, volume="fs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = Running(["mount", "fs@latest", str(mnt), "--files"], repo_dir, mnt / "plain.txt", tmp_path / "m.log")
    try:
        # the parser runs in a process of its own: stopped, it fails one call (EIO) and is replaced
        (parser,) = child_pids(mounted.proc.pid)
        os.kill(parser, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(OSError) as raised:
            os.listdir(mnt / "dir")
        assert raised.value.errno == errno.EIO and time.monotonic() - started < 30
        assert "made no progress for 10 s" in (tmp_path / "m.log").read_text()
        assert sorted(os.listdir(mnt / "dir")) == sorted(os.listdir(tree / "dir"))
        assert child_pids(mounted.proc.pid) not in ([], [parser])
        # a reader that ended while idle is replaced without failing the next call
        os.kill(child_pids(mounted.proc.pid)[0], signal.SIGKILL)
        assert (mnt / "random.bin").read_bytes() == (tree / "random.bin").read_bytes()
        assert_same_tree(tree, mnt, owners=True)
        with pytest.raises(OSError):
            (mnt / "new-file").write_text("read-only")
        assert "its ext4 files" in (tmp_path / "m.log").read_text()
        run("umount", str(mnt))
        assert mounted.proc.wait(30) == 0
    finally:
        mounted.stop()


def test_restore_to_copies_the_served_volume_while_it_is_written(points: tuple[Path, Path], tmp_path: Path) -> None:
    requires("qemu-io")
    repo, _ = points
    latest = tmp_path / "latest.img"
    umbra("restore", "v@latest", str(latest), repo=repo)
    sock, target = tmp_path / "nbd.sock", tmp_path / "recovered.img"
    # the same as `umbra export v@latest --nbd unix:SOCK --restore-to TARGET`
    served = Running(["restore", "v@latest", str(target), "--from-export", "--nbd", f"unix:{sock}"], repo, sock,
                     tmp_path / "r.log")  # fmt: skip
    uri = f"nbd+unix:///v?socket={sock}"
    expected = bytearray(latest.read_bytes())
    try:
        rng = random.Random(3)
        for _ in range(20):  # writes land before and after the copy cursor
            offset, length = rng.randrange(0, 8 * MiB - 70000), rng.choice([512, 4096, 65536, 70000])
            pattern = rng.randrange(1, 256)
            run("qemu-io", "-f", "raw", uri, "-c", f"write -P {pattern} {offset} {length}")
            expected[offset : offset + length] = bytes([pattern]) * length
    finally:
        assert served.stop() == 0, (tmp_path / "r.log").read_text()
    assert "every write included" in (tmp_path / "r.log").read_text()
    assert target.read_bytes() == bytes(expected)


class _MemExport:
    """A read-only in-memory block view standing in for a point (the CLI test above uses a real one)."""

    read_only, name, description = True, "m", "memory"

    def __init__(self, data: bytes) -> None:
        self.data, self.size = data, len(data)

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]

    def allocation(self, offset: int, length: int):
        yield offset, offset + length, True


def test_restoring_export_converges_under_concurrent_writes(tmp_path: Path) -> None:
    base = _MemExport(random.Random(1).randbytes(2 * MiB))
    overlay = OverlayExport(base, str(tmp_path / "overlay"))
    restoring = RestoringExport(overlay, open_target(str(tmp_path / "target.img"), base.size))
    restoring.CHUNK = 8192  # many steps, so writes interleave with the copy
    restoring.start()

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(300):
            offset = rng.randrange(0, base.size - 10000)
            if rng.random() < 0.2:
                restoring.zero(offset, rng.randrange(1, 9000), fua=False)
            else:
                restoring.write(offset, rng.randbytes(rng.randrange(1, 9000)), fua=False)

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert restoring.in_sync.wait(30)
    restoring.write(5, b"after the copy", fua=False)  # once in sync, writes still reach the target
    restoring.stop()
    restoring.flush()
    assert (tmp_path / "target.img").read_bytes() == overlay.read(0, base.size)
    stopped = RestoringExport(overlay, open_target(str(tmp_path / "t2.img"), base.size))
    stopped.CHUNK = 4096
    stopped._stop.set()  # stopped before it began: never claims to be in sync
    stopped.start()
    stopped.stop()
    assert not stopped.in_sync.is_set() and stopped.copied < base.size


def test_overlay_writes_and_zeroes_match_a_model(tmp_path: Path) -> None:
    """Random writes and zeroed ranges (any alignment) read back as a bytearray model says; zeroing
    the whole disk, as mkfs's discard does, leaves holes in the overlay, not megabytes of zeros."""
    size = 4 * MiB
    base = _MemExport(random.Random(2).randbytes(size))
    overlay = OverlayExport(base, str(tmp_path / "overlay"))
    model = bytearray(base.data)
    rng = random.Random(3)
    for _ in range(400):
        offset = rng.randrange(0, size - 1)
        length = rng.randrange(1, min(size - offset, 300_000) + 1)
        if rng.random() < 0.4:
            overlay.zero(offset, length, fua=False)
            model[offset : offset + length] = bytes(length)
        else:
            data = rng.randbytes(length)
            overlay.write(offset, data, fua=False)
            model[offset : offset + length] = data
    assert overlay.read(0, size) == bytes(model)
    assert base.data == random.Random(2).randbytes(size), "the base is never written"
    overlay.zero(0, size, fua=True)
    assert overlay.read(0, size) == bytes(size)
    assert os.stat(tmp_path / "overlay").st_blocks * 512 <= 64 * 1024, "a whole-disk trim is holes"
    overlay.close()
