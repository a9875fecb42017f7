"""``umbra check --repair``: rebuild the index from what the packs really hold (RELIABILITY B7).

Every pack is read and every blob in its trailer verified (decrypted, decompressed, hashed against
its id).  The new index lists each blob that verifies, once; blobs that do not are dropped from it,
and the good blobs of a damaged pack are copied into new packs, so the damaged pack is no longer
indexed (prune removes it later).  Good data is never dropped: a blob stays listed if any copy of
it verifies.  Old index files are deleted only after the new ones are stored.

Afterwards a point that needs a dropped block says so (``check``); ``restore --allow-damaged``
restores the rest of it with zeros in those blocks, and the next backup of a source that still
holds the same content stores the block again, which heals every point that needs it (blocks are
named by their content).  The caller holds the exclusive lock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import blake3

from umbra.errors import IntegrityError, RepositoryError
from umbra.repo.index import Index, encode_index
from umbra.repo.pack import PackEntry, parse_trailer
from umbra.repo.repository import Repository
from umbra.repo.writer import BlobWriter

Report = Callable[[str], None]


@dataclass
class RepairResult:
    packs: int = 0
    blobs_kept: int = 0
    dropped: list[str] = field(default_factory=list)  # what was dropped, one line each
    repacked: list[str] = field(default_factory=list)  # damaged packs whose good blobs were moved
    damaged_points: dict[str, int] = field(default_factory=dict)  # point id -> blocks it lacks


def repair(repo: Repository, report: Report | None = None) -> RepairResult:
    res = RepairResult()
    note = report or (lambda _: None)
    old_index_files = list(repo.backend.list("index"))
    keep: dict[str, list[PackEntry]] = {}  # intact packs: indexed as they are
    salvage: dict[str, list[tuple[PackEntry, bytes]]] = {}  # damaged packs: their good blobs, opened
    have: set[bytes] = set()
    for name in list(repo.backend.list("data")):
        pack_id = name.rsplit("/", 1)[1]
        note(pack_id)
        try:
            data = repo.backend.load(name)
            entries = parse_trailer(repo.crypto, data, len(data), f"pack {pack_id}")
        except RepositoryError as exc:
            res.dropped.append(f"pack {pack_id}: unreadable, every blob in it dropped ({exc})")
            continue
        res.packs += 1
        intact = blake3.blake3(data).hexdigest() == pack_id
        good: list[tuple[PackEntry, bytes]] = []
        for e in entries:
            kind = e.blob_type.name.lower()
            where = f"{kind} blob {e.blob_id.hex()[:16]} in pack {pack_id[:16]} at offset {e.offset}"
            try:
                plain = repo.crypto.open_blob(
                    e.blob_type, e.blob_id, data[e.offset : e.offset + e.length], repo.max_blob_size(e.blob_type), where
                )
            except IntegrityError as exc:
                intact = False
                res.dropped.append(exc.message)  # (it names the blob, pack and offset)
                continue
            good.append((e, plain))
        if intact:
            keep[pack_id] = entries
            have.update(e.blob_id for e in entries)
        else:
            salvage[pack_id] = good
    writer = BlobWriter(repo, index=Index(pack_lists=False))
    for pack_id, good in salvage.items():
        for e, plain in good:
            if e.blob_id not in have:
                have.add(e.blob_id)
                writer.add(e.blob_type, e.blob_id, repo.crypto.seal_blob(e.blob_type, e.blob_id, plain), len(plain))
        res.repacked.append(pack_id)
    writer.finish()
    new_index_files = list(writer.index_files)
    if keep:
        index_id, data = encode_index(repo.crypto, keep)
        repo.store_content_addressed(f"index/{index_id}", data)
        new_index_files.append(index_id)
    for name in old_index_files:
        if name.split("/", 1)[1] not in new_index_files:
            repo.backend.delete(name)
    repo.invalidate_index()
    res.blobs_kept = len(have)
    res.damaged_points = _damaged_points(repo)
    return res


def _damaged_points(repo: Repository) -> dict[str, int]:
    index = repo.index
    out: dict[str, int] = {}
    for pid in repo.point_ids():
        try:
            reader = repo.tree_reader(repo.load_point(pid), tolerate_damage=True)
            missing = sum(1 for _, bid in reader.blocks() if bid not in index)  # (DAMAGED_ID never is)
        except RepositoryError:
            missing = -1  # its manifest is gone or damaged
        if missing:
            out[pid] = missing
    return out
