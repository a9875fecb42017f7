"""Mutated filesystem images against ``ls`` and ``extract`` (RELIABILITY H3): each mutant is listed
and extracted in the isolated child, as the CLI does, and must end in an answer or one umbra error
within the stall limit, never a crash or hang of the caller.  Used by the tests (a few dozen
mutants) and by ``bench/fuzz_filesystems.py`` (as long as asked).
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from umbra.engine import files
from umbra.engine.isolated import Progress, run_isolated
from umbra.errors import UmbraError
from umbra.volume.filesystem import FileSystem


@dataclass
class Outcome:
    seed: int
    result: str  # "ok", or the umbra error's class name
    message: str
    seconds: float


def ext_metadata(image: bytes) -> list[int]:
    """Positions of the non-zero bytes of an ext2/3/4 image's first superblock, group descriptors
    and first 64 inodes, where a changed byte most often reaches the parser."""
    block = 1024 << int.from_bytes(image[1024 + 24 : 1024 + 28], "little")
    gdt = 2048 if block == 1024 else block
    table = int.from_bytes(image[gdt + 8 : gdt + 12], "little") * block
    ranges = [(1024, 2048), (gdt, gdt + 64 * 32), (table, min(len(image), table + 64 * 256))]
    return [i for start, end in ranges for i in range(start, min(end, len(image))) if image[i]]


def mutate(image: bytes, seed: int, hot: list[int], flips: int = 8) -> bytearray:
    """``image`` with ``flips`` random bytes changed, most of them at ``hot`` positions (see
    :func:`ext_metadata`), the rest anywhere."""
    rng = random.Random(seed)
    out = bytearray(image)
    for _ in range(flips):
        pos = rng.choice(hot) if hot and rng.random() < 0.8 else rng.randrange(len(out))
        out[pos] = rng.choice((0, 0xFF, rng.randrange(256), out[pos] ^ (1 << rng.randrange(8))))
    return out


def check_mutant(image: bytes, seed: int, workdir: Path, hot: list[int], stall_s: float = 10.0) -> Outcome:
    """List and extract one mutant of ``image`` in the isolated child.  Raises what is not an
    umbra error (nothing should be)."""
    data = mutate(image, seed, hot)
    dest = workdir / f"extract-{seed}"

    def job(progress: Progress) -> dict[str, int]:
        def read(offset: int, length: int) -> bytes:
            return bytes(data[offset : offset + length])

        fs = FileSystem(files.NewReads(read, len(data), progress.tick), len(data), f"mutant {seed}")
        listed = files.list_entries(fs, "/", recursive=True, tick=progress.tick)
        extracted = files.extract(fs, "/", str(dest), owners=False, tick=progress.tick)
        return {"listed": len(listed), "files": extracted.counts.get("files", 0)}

    started = time.monotonic()
    try:
        answer = run_isolated(job, f"mutant {seed}", stall_s)
        result, message = "ok", f"{answer['listed']} entries, {answer['files']} files extracted"
    except UmbraError as exc:
        result, message = type(exc).__name__, exc.message
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    return Outcome(seed, result, message, time.monotonic() - started)
