"""RELIABILITY G4: the used-block map of an image file that another process is writing, without
fsync, has every block that holds data (checked against a full read), and so does the map of an
ext4 image whose filesystem is frozen while it is mapped."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import requires
from tests.loopdev import loop_device, mounted
from umbra.testing.volumes import make_ext4
from umbra.volume.source import open_source
from umbra.volume.usedmap import build_used_map

BLOCK = 4096
WRITER = """
import os, random, sys
path, size, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
fd = os.open(path, os.O_WRONLY)
for line in sys.stdin:  # one batch of writes per line; never an fsync
    for _ in range(int(line)):
        os.pwrite(fd, rng.randbytes(4096), rng.randrange(size // 4096) * 4096)
    print("done", flush=True)
"""


def _blocks_with_data(path: Path) -> set[int]:
    out = set()
    with open(path, "rb") as f:
        for i, block in enumerate(iter(lambda: f.read(BLOCK), b"")):
            if block.count(0) != len(block):
                out.add(i)
    return out


def _mapped(path: Path) -> set[int]:
    with open_source(str(path)) as source:
        used = build_used_map(source)
    return {b for b, _ in used.blocks(BLOCK)}


@pytest.mark.slow
def test_a_file_written_without_fsync_maps_every_block_with_data(tmp_path: Path) -> None:
    image = tmp_path / "busy.img"
    size = 64 << 20
    with open(image, "wb") as f:
        f.truncate(size)  # all holes
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(image), str(size), "7"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdin is not None and writer.stdout is not None
    try:
        for batch in range(100):
            writer.stdin.write(f"{random.Random(batch).randint(1, 40)}\n")
            writer.stdin.flush()
            assert writer.stdout.readline().strip() == "done"  # written, still dirty in the page cache
            missing = _blocks_with_data(image) - _mapped(image)
            assert not missing, f"batch {batch}: blocks with data reported as holes: {sorted(missing)[:10]}"
    finally:
        writer.stdin.close()
        writer.wait()


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.loopdev
def test_a_frozen_filesystem_maps_every_block_with_data(tmp_path: Path) -> None:
    requires("loop", "mkfs.ext4")
    image = make_ext4(tmp_path / "fs.img", 32 << 20, None, garbage=False)  # (free space: zeros)
    rng = random.Random(3)
    with loop_device(image) as dev, mounted(dev, tmp_path / "mnt", "rw") as mnt:
        for i in range(30):
            with open(mnt / f"f{i}", "wb") as f:  # no fsync: the freeze flushes them
                f.write(rng.randbytes(rng.randint(1, 300_000)))
        subprocess.run(["fsfreeze", "--freeze", str(mnt)], check=True)
        try:
            mapped = _mapped(image)  # the image as the frozen filesystem left it
            with_data = _blocks_with_data(image)
        finally:
            subprocess.run(["fsfreeze", "--unfreeze", str(mnt)], check=True)
    assert with_data - mapped == set()
    assert len(with_data) > 30 * 10  # the files are there (in the image file's page cache, not fsynced)
