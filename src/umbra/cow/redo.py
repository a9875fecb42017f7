"""Crash recovery of a protected volume from its journal (redo, as a database replays its WAL).

The journal is write-ahead: a write's record is in the journal file before the volume changes.  A
daemon killed between the two leaves records whose writes never reached the volume, or reached
only the page cache of a machine that then stopped; a client may also never have seen them
acknowledged.  Either way the journal would then describe writes the volume does not hold, and
every later ``VOLUME@TIME`` would differ from what the volume really was.  And since a flush
makes only the journal durable (the engine syncs the volume at checkpoints), a power loss can
take from the volume writes that clients saw flushed.  Replaying, in order, every record after
the volume's last checkpoint (:meth:`Journal.load_checkpoint`: the newest sequence number whose
write was durable in the volume at a checkpoint, or written to its page cache if the machine has
not restarted since) makes the volume hold exactly what the journal says; writing a block again
with the bytes the journal says it holds is harmless, so replaying too much is only slower.

A replay is not safe across a gap: writes made while the journal was not recording would be
overwritten by older journaled ones.  Then nothing is replayed and the caller is told so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from umbra.cow.journal import MARK, ZERO, Journal
from umbra.volume.backing import Backing

log = logging.getLogger(__name__)


@dataclass
class RedoResult:
    records: int  # writes and zeroes replayed onto the volume
    bytes: int
    from_seq: int  # the checkpoint replayed from
    skipped: str | None = None  # why nothing was replayed


def replay_onto(journal: Journal, backing: Backing) -> RedoResult:
    """Replay the records after the journal's checkpoint onto ``backing``, flush it and move the
    checkpoint (the caller holds the volume exclusively: nothing else writes it meanwhile)."""
    start = journal.load_checkpoint()
    if journal.gap is not None:
        return RedoResult(0, 0, start, skipped="the journal is in a gap")
    records = list(journal.records(with_data=False, after_seq=start))
    if any(r.kind == MARK and r.mark.get("kind") == "gap" for r in records):
        return RedoResult(0, 0, start, skipped="a gap follows the checkpoint")
    done, nbytes = 0, 0
    for record in journal.records(with_data=True, after_seq=start):
        end = min(record.offset + record.length, backing.size)
        if record.kind == MARK or end <= record.offset:
            continue
        if record.kind == ZERO:
            backing.zero(record.offset, end - record.offset)
        else:
            backing.pwrite(memoryview(record.data)[: end - record.offset], record.offset)
        done, nbytes = done + 1, nbytes + end - record.offset
    backing.flush()
    journal.save_checkpoint(journal.last_seq)
    return RedoResult(done, nbytes, start)
