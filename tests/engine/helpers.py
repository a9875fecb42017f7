"""Shared helpers for engine tests."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from umbra.engine import backup, restore
from umbra.repo.manifest import Point
from umbra.repo.repository import Repository


def sha(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def do_backup(
    repo: Repository, source: Path, volume: str = "v", type_: str = "full", all_blocks: bool = False
) -> Point:
    return backup.run(repo, backup.BackupOptions(str(source), volume, type_, all_blocks=all_blocks, workers=2)).point


def restored(repo: Repository, point: Point, dest: Path) -> Path:
    if dest.exists():
        dest.unlink()
    restore.run(repo, point, str(dest))
    return dest


def write_at(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)
