"""The local backend's writes: large objects through O_DIRECT come back byte for byte, and a
filesystem that fills up mid-object gives RepositoryFull and leaves no temporary file."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import requires
from umbra.errors import RepositoryFull
from umbra.repo.backends import LocalBackend, local

SIZES = [local.DIRECT_MIN - 1, local.DIRECT_MIN, local.DIRECT_MIN + 4096, 3 * local.DIRECT_MIN + 777]


@pytest.mark.parametrize("size", SIZES)
def test_objects_come_back_exactly_whatever_their_size(tmp_path: Path, size: int) -> None:
    path = tmp_path / "object"
    data = os.urandom(size)
    local.atomic_write(path, data)
    assert path.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["object"]  # no temporary file left


@pytest.mark.root
def test_a_filesystem_filling_up_mid_object_is_repository_full(tmp_path: Path) -> None:
    requires("root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "none", str(mnt)], check=True)
    try:
        (mnt / "index").mkdir()
        backend = LocalBackend(mnt)
        with pytest.raises(RepositoryFull):
            backend.store("index/" + "ab" * 32, os.urandom(3 * local.DIRECT_MIN))  # a short O_DIRECT write first
        assert os.listdir(mnt / "index") == []  # the temporary file is gone
        backend.store("index/" + "cd" * 32, b"small")  # and the space with it
        assert (mnt / "index" / ("cd" * 32)).read_bytes() == b"small"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
