"""Byte extents ``(start, end)`` — sorted, non-overlapping, half-open — and their algebra."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

Extent = tuple[int, int]

_RUNS = re.compile(rb"\xff+|[^\x00\xff]")


def merge(extents: Iterable[Extent]) -> list[Extent]:
    """Sort and coalesce overlapping or touching extents, dropping empty ones."""
    out: list[Extent] = []
    for start, end in sorted(e for e in extents if e[1] > e[0]):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def intersect(a: list[Extent], b: list[Extent]) -> list[Extent]:
    out: list[Extent] = []
    i = j = 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(a: list[Extent], b: list[Extent]) -> list[Extent]:
    """Parts of merged extents ``a`` not covered by merged extents ``b``."""
    out: list[Extent] = []
    j = 0
    for start, end in a:
        while j < len(b) and b[j][1] <= start:
            j += 1
        k, pos = j, start
        while k < len(b) and b[k][0] < end:
            if b[k][0] > pos:
                out.append((pos, b[k][0]))
            pos = max(pos, b[k][1])
            k += 1
        if pos < end:
            out.append((pos, end))
    return out


def bitmap_runs(bitmap: bytes, nbits: int) -> Iterator[Extent]:
    """Runs of set bits (LSB first within each byte, as ext4 stores them), as bit ranges."""
    run_start = run_end = -1
    for m in _RUNS.finditer(bitmap):
        i, j = m.start(), m.end()
        if m.group()[0] == 0xFF:
            pieces: Iterable[Extent] = [(i * 8, j * 8)]
        else:
            byte = m.group()[0]
            pieces = [(i * 8 + k, i * 8 + k + 1) for k in range(8) if byte >> k & 1]
        for start, end in pieces:
            if start == run_end:
                run_end = end
                continue
            if run_start >= 0 and run_start < nbits:
                yield run_start, min(run_end, nbits)
            run_start, run_end = start, end
    if run_start >= 0 and run_start < nbits:
        yield run_start, min(run_end, nbits)


def blocks_in(extents: list[Extent], block_size: int) -> Iterator[tuple[int, list[Extent] | None]]:
    """For each block touched by ``extents``: (block number, None if wholly covered, else the
    covered ranges relative to the block start).  Blocks in increasing order."""
    current = -1
    ranges: list[Extent] = []

    def emit() -> tuple[int, list[Extent] | None]:
        covered = merge(ranges)
        return current, None if covered == [(0, block_size)] else covered

    for start, end in extents:
        first, last = start // block_size, (end - 1) // block_size
        for b in range(first, last + 1):
            if b != current:
                if current >= 0:
                    yield emit()
                current, ranges = b, []
            base = b * block_size
            ranges.append((max(start, base) - base, min(end, base + block_size) - base))
    if current >= 0:
        yield emit()
