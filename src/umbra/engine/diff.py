"""Differences between two points, found by comparing their trees: equal subtrees are skipped
without loading them, so the cost follows the change, not the volume size."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from umbra.errors import UsageError
from umbra.repo.cdp import Instant
from umbra.repo.format import ZERO_ID
from umbra.repo.manifest import Point
from umbra.repo.repository import Repository
from umbra.repo.tree import TreeReader
from umbra.repo.view import open_state


def tree_reader(repo: Repository, point: Point, tolerate_damage: bool = False) -> TreeReader:
    return repo.tree_reader(point, tolerate_damage=tolerate_damage)


def changed_blocks(repo: Repository, old: Point | None, new: Point) -> Iterator[int]:
    """Block numbers whose content differs between ``old`` and ``new`` (all non-zero blocks of
    ``new`` when ``old`` is None)."""
    if old is not None and (old.block_size != new.block_size or old.fanout != new.fanout):
        raise UsageError("cannot compare points with different block sizes or fan-outs")
    new_reader = tree_reader(repo, new)
    new_leaves = dict(new_reader.leaves())
    old_reader = tree_reader(repo, old) if old is not None else None
    old_leaves = dict(old_reader.leaves()) if old_reader is not None else {}
    for first in sorted(set(new_leaves) | set(old_leaves)):
        a, b = old_leaves.get(first, ZERO_ID), new_leaves.get(first, ZERO_ID)
        if a == b:
            continue
        ids_a = old_reader.leaf_blocks(a, first) if old_reader is not None and first in old_leaves else []
        ids_b = new_reader.leaf_blocks(b, first) if first in new_leaves else []
        for k in range(max(len(ids_a), len(ids_b))):
            x = ids_a[k] if k < len(ids_a) else ZERO_ID
            y = ids_b[k] if k < len(ids_b) else ZERO_ID
            if x != y:
                yield first + k


@dataclass
class DiffResult:
    ranges: list[tuple[int, int]]  # changed byte ranges [start, end)
    changed_bytes: int
    size_old: int
    size_new: int


def diff(repo: Repository, old: Point, new: Point) -> DiffResult:
    bs = new.block_size
    limit = max(old.size, new.size)
    ranges: list[tuple[int, int]] = []
    for b in changed_blocks(repo, old, new):
        start, end = b * bs, min((b + 1) * bs, limit)
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((start, end))
    if old.size != new.size:
        lo = min(old.size, new.size)
        if not ranges or ranges[-1][1] < limit:
            ranges.append((lo, limit))
        ranges = _merge(ranges)
    return DiffResult(ranges, sum(e - s for s, e in ranges), old.size, new.size)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(e, out[-1][1]))
        else:
            out.append((s, e))
    return out


def diff_states(repo: Repository, old_ref: str, new_ref: str) -> tuple[Instant, Instant, DiffResult]:
    """Like :func:`diff`, for states between points too (``VOLUME@TIME`` with a shipped journal):
    the blocks that the points' trees or either journal touched are compared byte for byte."""
    old, old_view = open_state(repo, old_ref)
    new, new_view = open_state(repo, new_ref)
    result = diff(repo, old.point, new.point)
    if not old.records and not new.records:
        return old, new, result
    bs = new.point.block_size
    candidates = {b for s, e in result.ranges for b in range(s // bs, -(-e // bs))}
    for view in (old_view, new_view):
        for start, end, _ in view.extents:
            candidates.update(range(start // bs, -(-end // bs)))
    limit = max(old.point.size, new.point.size)
    ranges = []
    for b in sorted(candidates):
        start, end = b * bs, min((b + 1) * bs, limit)
        if old_view.read(start, end - start) != new_view.read(start, end - start):
            ranges.append((start, end))
    merged = _merge(ranges)
    return old, new, DiffResult(merged, sum(e - s for s, e in merged), old.point.size, new.point.size)
