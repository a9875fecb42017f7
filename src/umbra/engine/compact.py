"""``umbra cdp compact``: turn old journal into points, then drop the journal they replace.

Writes younger than the retention window (``keep_within``) are all kept.  Older ones are thinned
to one state per ``every`` interval (the volume at the end of each interval that saw writes) and
one per bookmark (which keeps its name and consistency): each becomes a *synthetic* point, made
from the point before it and the journal records after it without reading the client again.  Only
blocks that the records touched are read, rewritten and stored; every other subtree of the tree is
the base point's.  Then the batches whose records all lie at or before the newest synthetic point
outside the window are deleted.  Manifests are written before anything is deleted, so a crash
leaves at worst batches that the next run deletes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from umbra import __version__
from umbra.engine.backup import _store_node
from umbra.errors import InstantInGap, UsageError
from umbra.repo import cdp
from umbra.repo.format import ZERO_ID, BlobType
from umbra.repo.manifest import Point, new_point_id
from umbra.repo.pointref import PointRef
from umbra.repo.repository import Repository
from umbra.repo.tree import TreeBuilder
from umbra.repo.view import open_state
from umbra.repo.writer import BlobWriter

SYNTHETIC = "synthetic"


@dataclass
class CompactResult:
    points: list[Point] = field(default_factory=list)
    batches_deleted: int = 0
    records_dropped: int = 0
    dry_run: bool = False
    planned: list[tuple[int, str, str]] = field(default_factory=list)  # (time, why, consistency)
    skipped: list[int] = field(default_factory=list)  # planned instants inside a journal gap


def materialize(repo: Repository, volume: str, when_ns: int, consistency: str, tags: list[str]) -> Point:
    """A synthetic point of ``volume`` at ``when_ns``: its base point plus the journal up to then."""
    moment = datetime.fromtimestamp(when_ns / 1e9, UTC)
    inst, view = open_state(repo, PointRef(f"{volume}@{when_ns}ns", volume=volume, time=moment, time_ns=when_ns))
    base = inst.point
    bs, fanout = base.block_size, base.fanout
    changed = sorted({b for start, end, _ in view.extents for b in range(start // bs, -(-end // bs))})
    writer = BlobWriter(repo)
    tree = TreeBuilder(fanout, lambda node: _store_node(repo, writer, node))
    reader = repo.tree_reader(base)
    stats = {"blocks_rewritten": len(changed), "records": len(inst.records), "bytes_read": 0}
    try:
        pending = iter(changed)
        next_changed = next(pending, None)
        for first, leaf in reader.leaves():
            for k, bid in enumerate(reader.leaf_blocks(leaf, first)):
                b = first + k
                if b == next_changed:
                    data = view.read(b * bs, bs)
                    stats["bytes_read"] += len(data)
                    bid = ZERO_ID if data.count(0) == len(data) else repo.crypto.blob_id(data)
                    if bid != ZERO_ID and not writer.known(bid):
                        writer.add(BlobType.DATA, bid, repo.crypto.seal_blob(BlobType.DATA, bid, data), len(data))
                    next_changed = next(pending, None)
                tree.add(bid)
        root, height = tree.finish()
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    last_seq = inst.records[-1].seq if inst.records else int(base.cdp["seq"])
    point = Point(
        id=new_point_id(),
        volume=volume,
        time=moment,
        type=SYNTHETIC,
        size=base.size,
        block_size=bs,
        fanout=fanout,
        root=root.hex(),
        height=height,
        parent=base.id,
        base=base.base,
        tags=tags,
        host=base.host,
        source=base.source,
        used_map=base.used_map,
        stats={**stats, "created": datetime.now(UTC).isoformat()},
        umbra_version=__version__,
        consistency=consistency,
        provider="cdp",
        cdp={"journal": base.cdp["journal"], "seq": last_seq, "time_ns": when_ns},
    )
    repo.save_point(point)
    return point


def _plan(points: list[Point], batches: list[cdp.Batch], cutoff_ns: int, every_ns: int) -> list[tuple[int, str, str]]:
    """(instant, why, consistency) of the synthetic points to make, oldest first."""
    first_point = min(p.state_time_ns for p in points)
    existing = {p.state_time_ns for p in points}
    wanted: dict[int, tuple[str, str]] = {}
    interval_last: dict[int, int] = {}  # interval number -> newest record time in it
    for batch in batches:
        for record in batch.records:
            t = record.time_ns
            if t <= first_point or t > cutoff_ns:
                continue
            mark = cdp.bookmark_of(record)
            if mark is not None:
                at = int(mark["time_ns"])
                if first_point < at <= cutoff_ns:
                    wanted[at] = (f"bookmark {mark.get('name')}", str(mark.get("consistency") or "crash-consistent"))
            elif record.kind != cdp.MARK:
                slot = t // every_ns
                interval_last[slot] = max(interval_last.get(slot, 0), t)
    for t in interval_last.values():
        wanted.setdefault(t, ("interval", "crash-consistent"))
    return sorted((t, why, consistency) for t, (why, consistency) in wanted.items() if t not in existing)


def compact(
    repo: Repository,
    volume: str,
    keep_within_s: float,
    every_s: float,
    dry_run: bool = False,
    now_ns: int | None = None,
) -> CompactResult:
    """Compact ``volume``'s journal older than ``keep_within_s``; the caller holds the exclusive lock."""
    if keep_within_s < 0 or every_s <= 0:
        raise UsageError("--keep-within must be >= 0 and --every > 0")
    points = [p for p in repo.list_points(volume) if p.cdp.get("journal")]
    if not points:
        return CompactResult(dry_run=dry_run)
    journal = str(max(points, key=lambda p: p.state_time_ns).cdp["journal"])
    points = [p for p in points if p.cdp["journal"] == journal]
    cutoff_ns = (now_ns or time.time_ns()) - int(keep_within_s * 1e9)
    batches = [cdp.load_batch(repo, ref) for ref in cdp.list_batches(repo, journal)]
    result = CompactResult(dry_run=dry_run, planned=_plan(points, batches, cutoff_ns, int(every_s * 1e9)))
    if dry_run:
        return result
    for when, why, consistency in result.planned:
        tags = ["cdp-compact"] + ([why.removeprefix("bookmark ")] if why.startswith("bookmark ") else [])
        try:
            result.points.append(materialize(repo, volume, when, consistency, tags))
        except InstantInGap:
            result.skipped.append(when)  # the journal lacks writes before it: no state to keep
    anchors = [p for p in [*points, *result.points] if p.state_time_ns <= cutoff_ns]
    if not anchors:
        return result
    anchor_seq = max(int(p.cdp["seq"]) for p in anchors)  # every later instant resolves from here on
    for batch in batches:
        if batch.ref.last_seq <= anchor_seq:
            repo.backend.delete(batch.ref.name)
            result.batches_deleted += 1
            result.records_dropped += len(batch.records)
    return result
