"""``umbra check``: verify the repository's structure, and with ``read_data`` every byte.

Every problem is collected (never only the first): damaged or missing index files, packs missing or
of the wrong size, trailers that disagree with the index, manifests that do not open, tree nodes
that do not load, blocks referenced but not indexed, and, reading data, packs whose bytes do not
hash to their name and blobs that do not open or match their id.  Packs that no index lists are
garbage from an interrupted operation: reported as a warning, removed by ``prune``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import blake3

from umbra.errors import IntegrityError, ObjectMissing, RepositoryError
from umbra.repo import cdp
from umbra.repo.format import PACK_FOOTER, ZERO_ID
from umbra.repo.index import Index, decode_index
from umbra.repo.pack import PackEntry, pack_name, parse_trailer
from umbra.repo.repository import Repository, flaky_read_notice

Report = Callable[[str], None]


@dataclass
class CheckResult:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    points: int = 0
    journal_batches: int = 0
    packs: int = 0
    blobs: int = 0
    bytes_read: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors


def _load_index(repo: Repository, res: CheckResult) -> tuple[Index, dict[str, list[PackEntry]]]:
    index = Index(pack_lists=False)  # (the pack lists are kept below)
    packs: dict[str, list[PackEntry]] = {}
    for name in repo.backend.list("index"):
        try:
            data = repo.backend.load(name)
            if blake3.blake3(data).hexdigest() != name.split("/")[1]:
                res.errors.append(f"{name}: content does not match its name")
            for pack_id, entries in decode_index(repo.crypto, data, name).items():
                index.add_pack(pack_id, entries)
                packs.setdefault(pack_id, []).extend(entries)
        except RepositoryError as exc:
            res.errors.append(f"{name}: {exc}")
    return index, packs


def _check_packs(repo: Repository, packs: dict[str, list[PackEntry]], res: CheckResult) -> None:
    stored = {name.rsplit("/", 1)[1] for name in repo.backend.list("data")}
    for pack_id in sorted(stored - set(packs)):
        res.warnings.append(f"pack {pack_id} is not indexed (left by an interrupted operation; prune removes it)")
    for pack_id, entries in sorted(packs.items()):
        name = pack_name(pack_id)
        if pack_id not in stored:
            res.errors.append(f"pack {pack_id} is missing ({len(entries)} blobs)")
            continue
        try:
            size = repo.backend.size(name)
            end = max(e.offset + e.length for e in entries)
            tail_len = min(size, max(PACK_FOOTER.size, size - end))
            listed = _read_trailer(repo, pack_id, size, tail_len, res)
            trailer = {(e.blob_id, e.offset, e.length, e.blob_type) for e in listed}
        except RepositoryError as exc:
            res.errors.append(f"pack {pack_id}: {exc}")
            continue
        unknown = [e for e in entries if (e.blob_id, e.offset, e.length, e.blob_type) not in trailer]
        if unknown:
            res.errors.append(
                f"pack {pack_id}: {len(unknown)} index entries not in its trailer (first at offset {unknown[0].offset})"
            )
        res.packs += 1


def _read_trailer(repo: Repository, pack_id: str, size: int, tail_len: int, res: CheckResult) -> list[PackEntry]:
    """The pack's trailer, read once more before it is called damaged (RELIABILITY B5)."""
    name = pack_name(pack_id)

    def read() -> list[PackEntry]:
        tail = repo.backend.load(name, size - tail_len, tail_len)
        return parse_trailer(repo.crypto, tail, size, f"pack {pack_id}")

    try:
        return read()
    except IntegrityError as first:
        try:
            listed = read()
        except IntegrityError:
            raise first from None
    res.warnings.append(flaky_read_notice(f"pack {pack_id}", "its trailer"))
    return listed


def _check_points(repo: Repository, index: Index, res: CheckResult) -> None:
    repo._index = index
    for pid in repo.point_ids():
        try:
            point = repo.load_point(pid)
        except RepositoryError as exc:
            res.errors.append(f"point {pid}: {exc}")
            continue
        res.points += 1
        missing = 0
        reader = repo.tree_reader(point)
        try:
            for _, bid in reader.blocks():
                if bid not in index:
                    if missing == 0:
                        res.errors.append(f"point {pid}: block {bid.hex()[:16]} is referenced but not stored")
                    missing += 1
        except RepositoryError as exc:
            res.errors.append(f"point {pid} ({point.volume}): {exc}")
        if missing > 1:
            res.errors.append(f"point {pid}: {missing} blocks in all are referenced but not stored")


def _check_journal(repo: Repository, index: Index, res: CheckResult) -> None:
    """Every shipped journal batch opens, and every block it names is stored."""
    for ref in cdp.list_batches(repo):
        try:
            batch = cdp.load_batch(repo, ref)
        except RepositoryError as exc:
            res.errors.append(f"{ref.name}: {exc}")
            continue
        res.journal_batches += 1
        missing = [bid for bid in cdp.referenced_blobs(batch) if bid not in index]
        if missing:
            res.errors.append(f"{ref.name}: {len(missing)} blocks are referenced but not stored")


def _load_or_none(repo: Repository, name: str) -> bytes | None:
    try:
        return repo.backend.load(name)
    except RepositoryError:
        return None


def _read_data(repo: Repository, packs: dict[str, list[PackEntry]], res: CheckResult, report: Report) -> None:
    for pack_id, entries in sorted(packs.items()):
        try:
            data = repo.backend.load(pack_name(pack_id))
        except ObjectMissing:
            continue  # already reported as missing
        except RepositoryError as exc:
            res.errors.append(f"pack {pack_id}: {exc}")
            continue
        res.bytes_read += len(data)
        report(pack_id)
        if blake3.blake3(data).hexdigest() != pack_id:
            again = _load_or_none(repo, pack_name(pack_id))  # once more before calling it damaged (B5)
            if again is not None and blake3.blake3(again).hexdigest() == pack_id:
                res.warnings.append(flaky_read_notice(f"pack {pack_id}", "its content"))
                data = again
            else:
                res.errors.append(f"pack {pack_id}: content does not hash to its name (damaged)")
        for e in entries:
            what = f"blob {e.blob_id.hex()[:16]} in pack {pack_id[:16]} at offset {e.offset}"
            try:
                repo.crypto.open_blob(
                    e.blob_type, e.blob_id, data[e.offset : e.offset + e.length], repo.max_blob_size(e.blob_type), what
                )
                res.blobs += 1
            except RepositoryError as exc:
                res.errors.append(str(exc))


def check(repo: Repository, read_data: bool = False, report: Report | None = None) -> CheckResult:
    """Check the repository; the caller holds a shared lock."""
    res = CheckResult()
    index, packs = _load_index(repo, res)
    _check_packs(repo, packs, res)
    _check_points(repo, index, res)
    _check_journal(repo, index, res)
    if read_data:
        _read_data(repo, packs, res, report or (lambda _: None))
    if ZERO_ID in index:
        res.errors.append("the index lists the reserved all-zero id")
    return res
