"""Which ranges of a file ``extract`` reads, on NTFS and FAT as on ext4: only those its data runs
map, never an NTFS named stream's, and everything of a compressed file (whose "sparse" runs hold
data).  NTFS images are written by ntfs-3g through FUSE, FAT ones by mtools."""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.conftest import requires
from umbra.engine import files
from umbra.volume.filesystem import FileSystem

MiB = 1 << 20
SIZE = 64 * MiB
NTFS_COMPRESSED = 0x800  # FILE_ATTRIBUTE_COMPRESSED, set on a directory: new files in it are compressed
COMPRESSIBLE = (b"compressible " * 100_000)[:MiB]


def filesystem(image: Path) -> FileSystem:
    fd = os.open(image, os.O_RDONLY)
    return FileSystem(lambda offset, length: os.pread(fd, length, offset), SIZE, image.name)


def contents(fs: FileSystem, path: str) -> bytes:
    entry = fs.lookup(path)
    out = bytearray(entry.size)
    for offset, data in fs.read_file(entry):
        out[offset : offset + len(data)] = data
    return bytes(out)


def ntfs_image(tmp_path: Path, fill: Callable[[Path], None]) -> Path:
    requires("root", "mkntfs", "ntfs-3g")
    image, mnt = tmp_path / "ntfs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(SIZE)
    subprocess.run(["mkntfs", "-F", "-Q", "-q", str(image)], check=True, capture_output=True)
    subprocess.run(["ntfs-3g", "-o", "compression", str(image), str(mnt)], check=True, capture_output=True)
    try:
        fill(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    return image


def test_ntfs_files_read_only_their_runs(tmp_path: Path) -> None:
    def fill(mnt: Path) -> None:
        with open(mnt / "sparse", "wb") as f:
            f.write(b"head" * 1024)
            f.seek(30 * MiB)
            f.write(b"tail")
        (mnt / "streams").write_bytes(b"y" * 100_000)
        os.setxattr(mnt / "streams", "user.ads", b"a named stream " * 1000)  # ntfs-3g: a named $DATA
        (mnt / "tiny").write_bytes(b"resident")
        (mnt / "packed").mkdir()
        os.setxattr(mnt / "packed", "system.ntfs_attrib_be", NTFS_COMPRESSED.to_bytes(4, "big"))
        with open(mnt / "packed" / "file", "wb") as f:
            f.write(COMPRESSIBLE)
            f.seek(8 * MiB)
            f.write(b"end")

    fs = filesystem(ntfs_image(tmp_path, fill))
    assert fs.type_name == "ntfs"
    sparse = fs.lookup("/sparse")
    assert fs.data_ranges(sparse) == [(0, 4096), (30 * MiB, 30 * MiB + 4)]
    assert contents(fs, "/sparse") == b"head" * 1024 + bytes(30 * MiB - 4096) + b"tail"
    assert fs.data_ranges(fs.lookup("/streams")) == [(0, 100_000)]  # the unnamed stream's run only
    assert contents(fs, "/streams") == b"y" * 100_000
    assert fs.data_ranges(fs.lookup("/tiny")) is None  # kept in the MFT record
    assert contents(fs, "/tiny") == b"resident"
    packed = fs.lookup("/packed/file")
    assert fs.data_ranges(packed) is None  # compression units look sparse but are not
    assert contents(fs, "/packed/file") == COMPRESSIBLE + bytes(7 * MiB) + b"end"


def test_an_ntfs_file_that_claims_a_terabyte_extracts_as_the_holes_it_is(tmp_path: Path) -> None:
    image = ntfs_image(tmp_path, lambda mnt: (mnt / "big").write_bytes(b"head" * 25_000))
    claim_size(image, "big", 1 << 40)
    fs = filesystem(image)
    entry = fs.lookup("/big")
    assert entry.size == 1 << 40
    assert fs.data_ranges(entry) == [(0, 102_400)]  # its 25 clusters
    result = files.extract(fs, "/big", str(tmp_path / "out"), owners=False)
    out = tmp_path / "out" / "big"
    assert result.bytes_written == 102_400 and out.stat().st_size == 1 << 40
    with open(out, "rb") as f:
        assert f.read(100_000) == b"head" * 25_000
    assert out.stat().st_blocks * 512 < MiB


def claim_size(image: Path, name: str, size: int) -> None:
    """Make the unnamed $DATA of ``name``'s MFT record claim ``size`` bytes (allocated and real)."""
    data = bytearray(image.read_bytes())
    wanted = name.encode("utf-16-le")
    for record in range(0, len(data), 1024):
        if data[record : record + 4] != b"FILE":
            continue
        pos, named, stream = record + struct.unpack_from("<H", data, record + 0x14)[0], False, None
        while (kind := struct.unpack_from("<I", data, pos)[0]) != 0xFFFFFFFF:
            length = struct.unpack_from("<I", data, pos + 4)[0]
            if kind == 0x30:  # $FILE_NAME (resident): name length at +0x40, the name at +0x42
                value = pos + struct.unpack_from("<H", data, pos + 0x14)[0]
                named |= data[value + 0x42 : value + 0x42 + 2 * data[value + 0x40]] == wanted
            elif kind == 0x80 and data[pos + 8] == 1 and data[pos + 9] == 0:  # non-resident, unnamed
                stream = pos
            pos += length
        if named and stream is not None:
            struct.pack_into("<QQ", data, stream + 0x28, size, size)  # allocated, real
            image.write_bytes(data)
            return
    raise AssertionError(f"no MFT record of {name}")


def test_fat_files_read_their_cluster_chains(tmp_path: Path) -> None:
    requires("mkfs.vfat", "mcopy")
    image = tmp_path / "fat.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    subprocess.run(["mkfs.vfat", str(image)], check=True, capture_output=True)
    payload = os.urandom(300_000)
    (tmp_path / "r.bin").write_bytes(payload)
    subprocess.run(["mcopy", "-i", str(image), str(tmp_path / "r.bin"), "::r.bin"], check=True)
    fs = filesystem(image)
    assert fs.type_name.startswith("fat")
    assert fs.data_ranges(fs.lookup("/r.bin")) == [(0, 300_000)]
    assert contents(fs, "/r.bin") == payload
