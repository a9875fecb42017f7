"""``umbra prune``: forget points by policy, then collect garbage.

Runs under the exclusive lock, so no backup is in flight: liveness comes from the manifests alone,
never from file timestamps.  Ordering, so a crash at any step leaves every remaining point whole:

1. delete the manifests of forgotten points;
2. mark: every tree node and block referenced by the remaining points and by every shipped CDP
   journal batch (prune keeps batches whole: `cdp compact` is what removes them);
3. repack the live blobs of mostly-dead packs (unreferenced blobs and extra copies of a blob count
   as dead) into new packs (sealed envelopes are copied as they
   are: their associated data names the blob, not the pack), and index the new packs;
4. write one index file for the packs that stay, then delete every older index file;
5. only now delete packs that no index lists any more (dead, repacked, or left by a crash).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from umbra.errors import ObjectMissing
from umbra.repo import cdp
from umbra.repo.format import ZERO_ID
from umbra.repo.index import Index, encode_index
from umbra.repo.manifest import Point
from umbra.repo.pack import PackEntry, pack_name
from umbra.repo.repository import Repository
from umbra.repo.retention import Policy, apply
from umbra.repo.writer import BlobWriter

REPACK_DEAD_FRACTION = 0.2
Hook = Callable[[str], None]


@dataclass
class PruneResult:
    kept: list[Point]
    forgotten: list[Point]
    packs_deleted: int = 0
    packs_repacked: int = 0
    bytes_freed: int = 0
    dry_run: bool = False
    stats: dict[str, int] = field(default_factory=dict)


def live_blobs(repo: Repository, points: list[Point]) -> set[bytes]:
    live: set[bytes] = set()
    for p in points:
        reader = repo.tree_reader(p, lambda nid: _mark_node(repo, live, nid))
        for _, bid in reader.blocks():
            live.add(bid)
    live.discard(ZERO_ID)
    return live


def _mark_node(repo: Repository, live: set[bytes], node_id: bytes) -> bytes:
    live.add(node_id)
    return repo.load_tree_node(node_id)


def _chosen(index: Index, blob_id: bytes) -> tuple[str, int] | None:
    loc = index.get(blob_id)
    return None if loc is None else (loc.pack_id, loc.offset)


def prune(
    repo: Repository, policy: Policy, dry_run: bool = False, hook: Hook | None = None, volumes: list[str] | None = None
) -> PruneResult:
    """Forget points by ``policy`` and free their space.  The caller holds the exclusive lock.

    ``hook`` is called with the name of each step (tests use it to crash or interleave).
    """
    step = hook or (lambda _: None)
    repo.invalidate_index()
    # points umbra deleted that came back (an old copy, an interrupted prune) are deleted again
    gone = repo.returned_points()
    keep, forget = apply([p for p in repo.list_points() if p.id not in gone], policy, volumes)
    anchors = cdp.anchor_points(repo, keep + forget)  # the journal's writes start from these
    keep += [p for p in forget if p.id in anchors]
    forget = [p for p in forget if p.id not in anchors]
    result = PruneResult(keep, forget, dry_run=dry_run)
    if dry_run:
        return result
    for pid in sorted(gone):
        repo.delete_point(pid, "prune: it had come back after umbra deleted it")
    for p in forget:
        repo.delete_point(p.id, "prune")
    kept_ids = {p.id for p in keep}
    for name in repo.verification_names():  # results of `umbra verify` go with their point
        if repo.verification_point(name) not in kept_ids:
            repo.backend.delete(name)
    kept_sets = {p.set_id for p in keep if p.set_id}
    for name in repo.set_outcome_names():  # a set's outcome goes with the last of its points
        if name.split("/", 1)[1] not in kept_sets:
            repo.backend.delete(name)
    step("forgotten")
    collect_garbage(repo, keep, result, step)
    return result


def collect_garbage(repo: Repository, keep: list[Point], result: PruneResult, step: Hook) -> None:
    index = repo.index_with_pack_lists()
    live = live_blobs(repo, keep)
    for ref in cdp.list_batches(repo):
        live.update(cdp.referenced_blobs(cdp.load_batch(repo, ref)))
    step("marked")
    by_pack = index.packs()
    old_index_files = list(repo.backend.list("index"))
    stored = [name.rsplit("/", 1)[1] for name in repo.backend.list("data")]
    keep_packs: dict[str, list[PackEntry]] = {}
    repack: dict[str, list[PackEntry]] = {}
    for pack_id, entries in by_pack.items():
        # a blob is alive here if a point needs it and this is its chosen copy; other copies
        # (left by concurrent backups) are dead weight like unreferenced blobs
        alive = [e for e in entries if e.blob_id in live and _chosen(index, e.blob_id) == (pack_id, e.offset)]
        dead_bytes = sum(e.length for e in entries) - sum(e.length for e in alive)
        total = sum(e.length for e in entries)
        if not alive:
            continue
        if dead_bytes > REPACK_DEAD_FRACTION * total:
            repack[pack_id] = alive
        else:
            keep_packs[pack_id] = entries
    writer = BlobWriter(repo, index=Index(pack_lists=False))
    for pack_id, entries in repack.items():
        for e in entries:
            envelope = repo.backend.load(pack_name(pack_id), e.offset, e.length)
            writer.add(e.blob_type, e.blob_id, envelope, 0)
    writer.finish()  # new packs stored and indexed (in their own index file)
    step("repacked")
    new_index_files: list[str] = list(writer.index_files)
    if keep_packs:
        index_id, data = encode_index(repo.crypto, keep_packs)
        repo.store_content_addressed(f"index/{index_id}", data)
        new_index_files.append(index_id)
    step("indexed")
    for name in old_index_files:
        if name.split("/", 1)[1] not in new_index_files:
            repo.backend.delete(name)
    step("unindexed")
    still_listed = set(keep_packs) | set(writer.index.pack_ids())
    for pack_id in stored:
        if pack_id in still_listed:
            continue
        name = pack_name(pack_id)
        try:
            result.bytes_freed += repo.backend.size(name)
            repo.backend.delete(name)
        except ObjectMissing:
            continue
        result.packs_deleted += 1
    result.packs_repacked = len(repack)
    repo.backend.remove_temporaries()
    repo.invalidate_index()
    step("done")
