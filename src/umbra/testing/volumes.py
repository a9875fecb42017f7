"""Deterministic test volumes: file trees, ext4 images with garbage in free space, mutations."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

SBIN = "/usr/sbin:/sbin"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = env.get("PATH", "") + ":" + SBIN
    return env


def run(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(args), check=True, capture_output=True, env=_env(), input=input)


def make_tree(root: Path, seed: int, files: int = 40, max_size: int = 256 * 1024) -> Path:
    """A tree of compressible, incompressible and duplicated files; deterministic per seed."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    previous: bytes | None = None
    for i in range(files):
        sub = root / f"dir{i % 5}"
        sub.mkdir(exist_ok=True)
        size = rng.randint(0, max_size)
        kind = rng.choice(["text", "random", "dup", "zeros"])
        if kind == "text":
            data = (f"line {seed}-{i} " * (size // 12 + 1)).encode()[:size]
        elif kind == "dup" and previous is not None:
            data = previous
        elif kind == "zeros":
            data = bytes(size)
        else:
            data = rng.randbytes(size)
        (sub / f"file{i}.bin").write_bytes(data)
        previous = data
    return root


def fill_garbage(path: Path, size: int, seed: int) -> None:
    """Create ``path`` of ``size`` bytes full of recognisable non-zero garbage."""
    rng = random.Random(seed)
    chunk = b"STALE-GARBAGE-" + rng.randbytes(1 << 16)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)


def make_ext4(
    path: Path,
    size: int,
    tree: Path | None,
    seed: int = 0,
    block_size: int = 4096,
    garbage: bool = True,
    fstype: str = "ext4",
) -> Path:
    """An ext2/3/4 image built with ``mkfs -d`` over garbage (``nodiscard`` keeps the garbage)."""
    if garbage:
        fill_garbage(path, size, seed)
    else:
        with open(path, "wb") as f:
            f.truncate(size)
    args = [f"mkfs.{fstype}", "-q", "-F", "-b", str(block_size), "-E", "nodiscard", "-U", "clear"]
    if tree is not None:
        args += ["-d", str(tree)]
    run(*args, str(path))
    return path


def debugfs(image: Path, *commands: str) -> str:
    """Run debugfs commands read-write on an unmounted image."""
    proc = run("debugfs", "-w", "-f", "-", str(image), input="\n".join(commands).encode() + b"\n")
    return proc.stdout.decode(errors="replace")


def write_file(image: Path, scratch: Path, name: str, data: bytes) -> None:
    """Replace (or create) file ``name`` in the image with ``data``."""
    scratch.write_bytes(data)
    debugfs(image, f"rm {name}", f"write {scratch} {name}")


def e2fsck_clean(image: Path | str) -> tuple[bool, str]:
    proc = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, env=_env(), check=False)
    return proc.returncode == 0, (proc.stdout + proc.stderr).decode(errors="replace")


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, symlinks=True)
