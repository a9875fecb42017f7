"""Bookmarks and the timeline of a protected volume.

A bookmark is a named, consistent instant in the CDP journal: the coordinator runs the snapshot
set as for a backup (writers frozen, filesystems held, the ``cow`` provider's snapshot marks the
journal at one instant), then the daemon records a ``bookmark`` mark naming that instant, and the
snapshot is deleted at once: nothing is read or stored but the mark.  ``VOLUME@TIME`` with the
bookmark's time then gives exactly that consistent state.

The timeline lists, oldest first, a volume's points and the bookmarks of the journals they belong
to, with their consistency, so that a user can pick "the last consistent moment before 10:32".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from umbra.coordinator.snapshot_set import SetOptions, SnapshotSet
from umbra.errors import UsageError
from umbra.frontends.control import ControlClient
from umbra.repo import cdp
from umbra.repo.repository import Repository
from umbra.writers.base import Writer


def bookmark(volume: str, name: str, writers: list[Writer], options: SetOptions | None = None) -> dict[str, Any]:
    """Take a consistent bookmark NAME of protected volume ``volume``; returns the daemon's record."""
    if not name or len(name) > 128 or any(c in name for c in "\n\r\0"):
        raise UsageError(f"invalid bookmark name {name!r}")
    options = dataclasses.replace(options or SetOptions(), providers=["cow"])
    snapshot_set = SnapshotSet([volume], writers, options)
    (snap,) = snapshot_set.create()
    try:
        if not snap.cdp:
            raise UsageError(f"{volume} keeps no journal (--no-journal): bookmarks need one")
        client = ControlClient(snap.handle["volume"], Path(snap.handle["state"]))
        doc: dict[str, Any] = client.call(
            "bookmark",
            name=name,
            snapshot=snap.handle["snapshot"],
            consistency=snapshot_set.consistency,
            set_id=snapshot_set.set_id,
        )
    except BaseException as exc:
        snapshot_set.complete(False, [], str(exc))
        raise
    snapshot_set.complete(True, [])
    return doc


@dataclass
class Event:
    time_ns: int
    kind: str  # point, bookmark or gap
    name: str  # point id, the bookmark's name, or why the gap's writes are missing
    consistency: str
    detail: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def timeline(repo: Repository, volume: str) -> tuple[list[Event], dict[str, Any]]:
    """Points, shipped bookmarks, journal gaps and clock steps of ``volume``, oldest first; and the
    journal's shipped span."""
    points, _ = repo.scan_points(volume)
    events = [
        Event(p.state_time_ns, "point", p.id, p.consistency or "crash-consistent", {"type": p.type, "tags": p.tags})
        for p in points
    ]
    journals = {str(p.cdp["journal"]) for p in points if p.cdp.get("journal")}
    span: dict[str, Any] = {"journals": sorted(journals), "first_ns": None, "last_ns": None, "records": 0}
    for journal in sorted(journals):
        for ref in cdp.list_batches(repo, journal):
            batch = cdp.load_batch(repo, ref)
            first, last = batch.records[0].time_ns, batch.records[-1].time_ns
            span["first_ns"] = first if span["first_ns"] is None else min(span["first_ns"], first)
            span["last_ns"] = last if span["last_ns"] is None else max(span["last_ns"], last)
            span["records"] += len(batch.records)
            for record in batch.records:
                gap = cdp.gap_of(record)
                if gap is not None:
                    event = Event(
                        int(gap["since_ns"]),
                        "gap",
                        str(gap.get("reason", "")),
                        "-",
                        {"journal": journal, "until_ns": record.time_ns, "seq": record.seq},
                    )
                    if event not in events:
                        events.append(event)
                step = cdp.clock_step_of(record)
                if step is not None:
                    detail = {
                        "journal": journal,
                        "seq": record.seq,
                        "raw_ns": step.get("raw_ns"),
                        "step_ns": step["step_ns"],
                    }
                    event = Event(
                        record.time_ns, "clock", f"the wall clock stepped {_seconds(step['step_ns'])}", "-", detail
                    )
                    if event not in events:
                        events.append(event)
                mark = cdp.bookmark_of(record)
                if mark is not None:
                    detail = {"journal": journal, "seq": mark.get("seq"), "set_id": mark.get("set_id")}
                    event = Event(
                        int(mark["time_ns"]), "bookmark", str(mark.get("name")), str(mark.get("consistency")), detail
                    )
                    if event not in events:  # a batch shipped twice lists its marks twice
                        events.append(event)
    events.sort(key=lambda e: (e.time_ns, e.kind))
    return events, span


def _seconds(ns: int) -> str:
    """A clock step for people, to the second: ``-1 h``, ``+1 d 1 h``."""
    sign, rest = ("-" if ns < 0 else "+"), round(abs(ns) / 1e9)
    units = []
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min"), (1, "s")):
        count, rest = divmod(rest, size)
        if count:
            units.append(f"{count} {unit}")
    return sign + (" ".join(units) or "0 s")
