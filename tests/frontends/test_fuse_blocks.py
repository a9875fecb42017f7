"""FUSE block files served over the kernel's protocol (umbra.frontends.fuse_blocks): real mounts,
real system calls, bytes checked against the engine's backing file and journal."""

from __future__ import annotations

import errno
import mmap
import os
import pwd
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import requires
from tests.cow.helpers import make_volume
from umbra.cow.engine import CowVolume
from umbra.cow.journal import WRITE, ZERO, Journal
from umbra.frontends import fuse_wire as w
from umbra.frontends.exports import BlockExport, exports_of
from umbra.frontends.fuse_blocks import FuseBlockFiles

MiB = 1 << 20
SIZE = 16 * MiB

Served = tuple[FuseBlockFiles, dict[str, BlockExport]]
pytestmark = pytest.mark.root


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[CowVolume]:
    requires("root")
    journal = Journal.open(tmp_path / "journal", SIZE, direct=True, commit_interval=3600)
    vol = make_volume(tmp_path, SIZE, 64 * 1024, journal=journal, checkpoint_interval=3600)
    yield vol
    vol.close()
    journal.close()


@pytest.fixture
def served(volume: CowVolume, tmp_path: Path) -> Iterator[Served]:
    exports = exports_of(volume)
    files = FuseBlockFiles(lambda: exports, tmp_path / "mnt", volume.name)
    files.start()
    yield files, exports
    files.stop()


def _aligned(data: bytes) -> mmap.mmap:
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    return buf


def test_listing_attributes_and_statfs(served: Served, volume: CowVolume) -> None:
    files, exports = served
    volume.create_snapshot("s1")
    exports.update(exports_of(volume))
    files.refresh()
    assert sorted(os.listdir(files.directory)) == ["v.img", "v@s1.img"]
    assert [e.name for e in os.scandir(files.directory)] == ["v.img", "v@s1.img"]  # in inode order
    st = os.stat(files.image_path())
    assert (st.st_size, st.st_mode & 0o777, st.st_blksize) == (SIZE, 0o600, 4096)
    assert os.stat(files.image_path("v@s1")).st_mode & 0o777 == 0o400
    fs = os.statvfs(files.directory)
    assert (fs.f_bsize, fs.f_blocks, fs.f_files) == (4096, 2 * SIZE // 4096, 2)
    with pytest.raises(FileNotFoundError):
        os.stat(os.path.join(files.directory, "nothing.img"))


def test_writes_go_through_the_engine_and_read_back(served: Served, volume: CowVolume) -> None:
    files, _ = served
    rng = random.Random(7)
    big = rng.randbytes(MiB)
    small = rng.randbytes(1000)
    fd = os.open(files.image_path(), os.O_RDWR | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [_aligned(big)], 3 * MiB) == MiB  # page-aligned: the journal's direct path
    finally:
        os.close(fd)
    with open(files.image_path(), "r+b", buffering=0) as f:
        assert f.seek(5 * MiB + 123) and f.write(small) == len(small)  # unaligned: staged by the journal
        os.fsync(f.fileno())
        f.seek(3 * MiB)
        assert f.read(MiB) == big
        f.seek(5 * MiB + 123)
        assert f.read(len(small)) == small
        f.seek(SIZE - 10)
        assert f.read(100) == bytes(10)  # a read past the end is cut at the end
    assert volume.read(3 * MiB, MiB) == big and volume.read(5 * MiB + 123, len(small)) == small
    assert volume.journal is not None
    writes = [(r.offset, r.data) for r in volume.journal.records() if r.kind == WRITE]
    assert writes == [(3 * MiB, big), (5 * MiB + 123, small)]
    assert volume.journal.durable_seq == volume.journal.last_seq  # fsync committed the journal


def test_snapshot_file_keeps_its_instant(served: Served, volume: CowVolume) -> None:
    files, exports = served
    before = random.Random(1).randbytes(MiB)
    with open(files.image_path(), "r+b", buffering=0) as f:
        f.seek(MiB)
        f.write(before)
    volume.create_snapshot("s1")
    exports.update(exports_of(volume))
    files.refresh()
    with open(files.image_path(), "r+b", buffering=0) as f:
        f.seek(MiB)
        f.write(bytes(MiB))
    with open(files.image_path("v@s1"), "rb", buffering=0) as f:
        f.seek(MiB)
        assert f.read(MiB) == before
    del exports["v@s1"]
    files.refresh()
    assert os.listdir(files.directory) == ["v.img"]


def test_edges_fail_cleanly_and_the_file_keeps_working(served: Served, volume: CowVolume) -> None:
    files, exports = served
    volume.create_snapshot("s1")
    exports.update(exports_of(volume))
    files.refresh()
    path = files.image_path()
    with pytest.raises(OSError) as ro:
        os.open(files.image_path("v@s1"), os.O_RDWR)
    assert ro.value.errno in (errno.EROFS, errno.EACCES)  # the kernel checks mode 0400 first for non-root
    with pytest.raises(PermissionError):
        os.open(path, os.O_RDWR | os.O_TRUNC)
    with pytest.raises(PermissionError):
        os.truncate(path, SIZE // 2)
    with open(path, "r+b", buffering=0) as f, pytest.raises(OSError) as past:
        f.seek(SIZE - 512)
        f.write(bytes(4096))
    assert past.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        os.mkdir(os.path.join(files.directory, "d"))
    with pytest.raises(OSError):
        os.setxattr(path, "user.x", b"1")
    with open(path, "r+b", buffering=0) as f:
        f.write(b"still fine")
        f.seek(0)
        assert f.read(10) == b"still fine"
    assert volume.read(SIZE - 512, 512) == bytes(512)  # the refused write changed nothing


def test_punched_holes_and_zeroed_ranges_go_through_the_engine(served: Served, volume: CowVolume) -> None:
    requires("fallocate")
    files, _ = served
    path = files.image_path()
    data = random.Random(5).randbytes(4 * MiB)
    with open(path, "r+b", buffering=0) as f:
        f.write(data)

    def fallocate(*args: int | str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["fallocate", *map(str, args), path], capture_output=True, text=True, check=False)

    assert fallocate("--punch-hole", "--offset", MiB, "--length", MiB).returncode == 0
    assert fallocate("--zero-range", "--offset", 3 * MiB, "--length", 4096).returncode == 0
    assert fallocate("--punch-hole", "--offset", SIZE - 4096, "--length", MiB).returncode == 0  # cut at the end
    allocate = fallocate("--offset", 0, "--length", MiB)  # reserving space: nothing to reserve
    assert allocate.returncode != 0 and "not supported" in allocate.stderr
    expected = bytearray(data)
    expected[MiB : 2 * MiB] = bytes(MiB)
    expected[3 * MiB : 3 * MiB + 4096] = bytes(4096)
    assert volume.read(0, 4 * MiB) == bytes(expected)
    assert volume.journal is not None
    zeros = [(r.offset, r.length) for r in volume.journal.records() if r.kind == ZERO]
    assert zeros == [(MiB, MiB), (3 * MiB, 4096), (SIZE - 4096, 4096)]


def test_concurrent_writers_match_a_model(served: Served, volume: CowVolume) -> None:
    files, _ = served
    model = bytearray(SIZE)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        region = SIZE // 8 * seed
        try:
            fd = os.open(files.image_path(), os.O_RDWR)
            try:
                for _ in range(40):
                    length = rng.choice([512, 4096, 65536, 256 * 1024])
                    offset = region + rng.randrange(0, SIZE // 8 - length)
                    data = rng.randbytes(length)
                    assert os.pwrite(fd, data, offset) == length
                    with lock:
                        model[offset : offset + length] = data
            finally:
                os.close(fd)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with open(files.image_path(), "rb", buffering=0) as f:
        assert f.read() == bytes(model)
    assert volume.read(0, SIZE) == bytes(model)


def test_unmount_from_outside_ends_the_workers(volume: CowVolume, tmp_path: Path) -> None:
    files = FuseBlockFiles(lambda: exports_of(volume), tmp_path / "mnt", volume.name)
    files.start()
    assert files.running
    subprocess.run(["umount", files.directory], check=True)
    deadline = time.monotonic() + 10
    while files.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not files.running
    files.stop()  # nothing left to unmount: no error
    assert not os.path.ismount(files.directory)


def test_loop_device_over_the_block_file(served: Served, volume: CowVolume) -> None:
    requires("loop")
    files, _ = served
    loop = files.attach_loop()
    try:
        data = random.Random(3).randbytes(2 * MiB)
        with open(loop, "r+b", buffering=0) as dev:
            dev.seek(4 * MiB)
            dev.write(data)
            os.fsync(dev.fileno())
        assert volume.read(4 * MiB, 2 * MiB) == data
        subprocess.run(["blkdiscard", "--offset", str(4 * MiB), "--length", str(MiB), loop], check=True)
        assert volume.read(4 * MiB, 2 * MiB) == bytes(MiB) + data[MiB:]  # a discard reads as zeros
    finally:
        files.stop()
    assert files.loop_device is None


# --- requests checked at the edge (no mount: the kernel never sends these) -------------------


def test_a_write_whose_length_disagrees_with_its_data_is_refused(volume: CowVolume, tmp_path: Path) -> None:
    files = FuseBlockFiles(lambda: exports_of(volume), tmp_path / "mnt", volume.name)
    files._refresh_names()
    head = bytearray(w.WRITE_HEAD)
    w.WRITE_IN.pack_into(head, w.IN_HEADER.size, 2, 0, 4096, 0, 0, 0, 0)
    with pytest.raises(OSError) as bad:
        files._write(head, memoryview(bytes(4096)), 100)
    assert bad.value.errno == errno.EINVAL
    w.WRITE_IN.pack_into(head, w.IN_HEADER.size, 99, 0, 4096, 0, 0, 0, 0)
    with pytest.raises(OSError) as unknown:
        files._write(head, memoryview(bytes(4096)), 4096)
    assert unknown.value.errno == errno.ENOENT
    with pytest.raises(OSError) as proto:
        files._init(0, w.INIT_IN.pack(8, 0, 0, 0))
    assert proto.value.errno == errno.EPROTO
    assert volume.read(0, 4096) == bytes(4096)


# --- without root: mounted through fusermount3 -------------------------------------------------

USER_SCRIPT = """
import os, sys
from umbra.errors import ServeError
from umbra.frontends.fuse_blocks import FuseBlockFiles

class Memory:
    name, size, read_only, description, inline = "m", 1 << 20, False, "memory", True
    def __init__(self): self.buf = bytearray(self.size)
    def read(self, offset, length): return bytes(self.buf[offset : offset + length])
    def write(self, offset, data, fua): self.buf[offset : offset + len(data)] = data
    def zero(self, offset, length, fua): self.buf[offset : offset + length] = bytes(length)
    def flush(self): pass
    def allocation(self, offset, length): yield offset, offset + length, True

memory = Memory()
files = FuseBlockFiles(lambda: {"m": memory}, sys.argv[1], "m")
try:
    files.start()
except ServeError as exc:
    print("refused:", exc)
    raise SystemExit(3)
with open(files.image_path(), "r+b", buffering=0) as f:
    f.seek(4096)
    f.write(b"through fusermount3")
files.stop()
print(bytes(memory.buf[4096 : 4096 + 19]).decode(), os.path.ismount(sys.argv[1]))
"""


def _as_nobody(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    return subprocess.run(
        [*nobody, sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )


def test_an_unprivileged_user_mounts_through_fusermount3() -> None:
    requires("root", "setpriv", "fusermount3")
    if _as_nobody("import umbra").returncode != 0:
        pytest.skip("this checkout or its Python is not readable by the user nobody")
    directory = tempfile.mkdtemp(prefix="umbra-fuse-user-")
    os.chown(directory, pwd.getpwnam("nobody").pw_uid, -1)
    mode = os.stat("/dev/fuse").st_mode & 0o777
    try:
        os.chmod("/dev/fuse", 0o600)
        refused = _as_nobody(USER_SCRIPT, directory)
        assert refused.returncode == 3 and "cannot mount FUSE" in refused.stdout, refused.stderr
        assert "Permission denied" in refused.stdout  # what fusermount3 said, passed on
        os.chmod("/dev/fuse", 0o666)
        proc = _as_nobody(USER_SCRIPT, directory)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.split() == ["through", "fusermount3", "False"]
    finally:
        os.chmod("/dev/fuse", mode)
        os.rmdir(directory)
