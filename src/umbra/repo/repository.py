"""The repository facade: config, keys, index, blobs, points and locks over one backend.

Write ordering (docs/FORMAT.md): packs → index files → manifest.  Read ordering: manifests are
listed before the index is loaded, so a point that is visible always finds its blobs.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import blake3

from umbra.errors import (
    AmbiguousPoint,
    IntegrityError,
    KeyProblem,
    ObjectMissing,
    PassphraseMissing,
    PointNotFound,
    RepositoryNotFound,
    UnsupportedFormat,
    UsageError,
    WrongPassphrase,
)
from umbra.repo import keys
from umbra.repo.backends.base import Backend
from umbra.repo.crypto import Crypto
from umbra.repo.format import (
    AAD_FORGOTTEN,
    AAD_SET,
    AAD_VERIFY,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_FANOUT,
    DEFAULT_PACK_TARGET,
    FORMAT_VERSION,
    INDEX_ENTRY,
    MAX_BLOCK_SIZE,
    MIN_BLOCK_SIZE,
    TREE_HEADER,
    BlobType,
)
from umbra.repo.index import Index, Location, decode_index_records
from umbra.repo.index_cache import IndexCache, default_directory
from umbra.repo.locks import Lock
from umbra.repo.manifest import Point, open_point, seal_point
from umbra.repo.pack import pack_name
from umbra.repo.pointref import PointRef, parse_point_ref
from umbra.repo.tree import LoadNode, TreeReader

ENCRYPTION_MODES = ("aes-256-gcm", "none")
MAX_GAP = 256 * 1024  # coalesce blob reads in a pack across gaps up to this size
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RepoConfig:
    id: str
    encryption: str
    block_size: int
    fanout: int
    pack_target: int
    id_key: str | None = None  # only for unencrypted repositories

    @classmethod
    def parse(cls, data: bytes) -> RepoConfig:
        try:
            d = json.loads(data)
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
            if d.get("format") != FORMAT_VERSION:
                raise UnsupportedFormat(f"repository format {d.get('format')}", supported=FORMAT_VERSION)
            cfg = cls(d["id"], d["encryption"], d["block_size"], d["fanout"], d["pack_target"], d.get("id_key"))
            if not all(isinstance(x, str) for x in (cfg.id, cfg.encryption)) or not isinstance(cfg.id_key, str | None):
                raise ValueError("a field that should be text is not")
            if not all(type(x) is int and x > 0 for x in (cfg.block_size, cfg.fanout, cfg.pack_target)):
                raise ValueError("a size is not a positive integer")
            if cfg.fanout < 2:
                raise ValueError("fanout below 2")
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise IntegrityError(f"config is malformed ({exc})") from None
        if cfg.encryption not in ENCRYPTION_MODES:
            raise IntegrityError(f"config names unknown encryption {cfg.encryption!r}")
        return cfg

    def encode(self) -> bytes:
        d: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "id": self.id,
            "encryption": self.encryption,
            "block_size": self.block_size,
            "fanout": self.fanout,
            "pack_target": self.pack_target,
        }
        if self.id_key is not None:
            d["id_key"] = self.id_key
        return json.dumps(d, indent=1).encode()


def validate_geometry(block_size: int, fanout: int) -> None:
    if block_size & (block_size - 1) or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise UsageError(f"block size must be a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}")
    if not 2 <= fanout <= 4096:
        raise UsageError("fan-out must be from 2 to 4096")


def flaky_read_notice(obj: str, part: str) -> str:
    return (
        f"{obj}: {part} read back damaged the first time and good the second (succeeded on the second "
        "attempt): suspect the storage's hardware or its connection"
    )


class Repository:
    def __init__(self, backend: Backend, config: RepoConfig, crypto: Crypto, key_id: str | None) -> None:
        self.backend = backend
        self.config = config
        self.crypto = crypto
        self.key_id = key_id
        self._index: Index | None = None
        self.flaky_reads: list[str] = []  # reads that were damaged once and good the second time

    # --- creation and opening ----------------------------------------------------------------

    @classmethod
    def init(
        cls,
        backend: Backend,
        passphrase: str | None,
        encryption: str = "aes-256-gcm",
        block_size: int = DEFAULT_BLOCK_SIZE,
        fanout: int = DEFAULT_FANOUT,
        pack_target: int = DEFAULT_PACK_TARGET,
    ) -> Repository:
        if encryption not in ENCRYPTION_MODES:
            raise UsageError(f"encryption must be one of {', '.join(ENCRYPTION_MODES)}")
        validate_geometry(block_size, fanout)
        if encryption != "none" and not passphrase:
            raise PassphraseMissing()
        backend.create()
        repo_id = os.urandom(16).hex()
        id_key, enc_key = os.urandom(32), os.urandom(32)
        plain_id_key = base64.b64encode(id_key).decode() if encryption == "none" else None
        config = RepoConfig(repo_id, encryption, block_size, fanout, pack_target, plain_id_key)
        config_bytes = config.encode()
        key_id = None
        if encryption != "none":
            assert passphrase is not None
            master = keys.MasterKey(enc_key, id_key, blake3.blake3(config_bytes).hexdigest())
            key_id, key_bytes = keys.make_key_file(master, repo_id, passphrase)
            backend.store(f"keys/{key_id}", key_bytes)
        backend.store("config", config_bytes)  # last: a repository exists once its config does
        crypto = Crypto(bytes.fromhex(repo_id), id_key, None if encryption == "none" else enc_key)
        return cls(backend, config, crypto, key_id)

    @classmethod
    def open(cls, backend: Backend, passphrase: str | Callable[[], str | None] | None) -> Repository:
        """Open a repository, trying every key file with ``passphrase``.

        Raises:
            RepositoryNotFound, PassphraseMissing, WrongPassphrase, KeyProblem, IntegrityError.
        """
        try:
            config_bytes = backend.load("config")
        except ObjectMissing:
            raise RepositoryNotFound(location=backend.location) from None
        config = RepoConfig.parse(config_bytes)
        key_names = list(backend.list("keys"))
        if config.encryption == "none":
            if key_names or config.id_key is None:
                raise IntegrityError("config says unencrypted but key files exist: refusing a tampered config")
            id_key = base64.b64decode(config.id_key)
            return cls(backend, config, Crypto(bytes.fromhex(config.id), id_key, None), None)
        if callable(passphrase):
            passphrase = passphrase()  # asked only for encrypted repositories
        if not passphrase:
            raise PassphraseMissing()
        if not key_names:
            raise KeyProblem("the repository has no key files")
        for name in key_names:
            doc = keys.parse_key_file(backend.load(name), name)
            master = keys.unwrap(doc, passphrase)
            if master is None:
                continue
            if doc["repository"] != config.id or master.config_digest != blake3.blake3(config_bytes).hexdigest():
                raise IntegrityError("config does not match the key: it was modified; refusing to use it")
            crypto = Crypto(bytes.fromhex(config.id), master.id_key, master.enc_key)
            return cls(backend, config, crypto, doc["id"])
        raise WrongPassphrase()

    # --- locks -------------------------------------------------------------------------------

    @contextmanager
    def lock(self, exclusive: bool = False) -> Iterator[Lock]:
        lock = Lock(self.backend, exclusive)
        lock.acquire()
        try:
            yield lock
        finally:
            lock.release()

    # --- index and blobs ---------------------------------------------------------------------

    @property
    def index(self) -> Index:
        if self._index is None:
            self._index = self.load_index()
        return self._index

    def index_with_pack_lists(self) -> Index:
        """The index with every pack's full entry list (prune needs them; backups and restores do
        not, and a large repository's lists cost about 45 bytes a blob)."""
        if self._index is None or not self._index.pack_lists:
            self._index = None  # (the lighter one goes first)
            self._index = self.load_index(pack_lists=True)
        return self._index

    def load_index(self, pack_lists: bool = False) -> Index:
        """Every index file's locations; without pack lists, through the local index cache
        (:mod:`umbra.repo.index_cache`): only index files it does not hold are read."""
        names = list(self.backend.list("index"))
        cache = None if pack_lists else self.index_cache()
        cached = cache.load(names) if cache is not None else None
        index, covered = cached if cached is not None else (Index(pack_lists), set())
        files = [
            decode_index_records(self.crypto, self.backend.load(name), name) for name in names if name not in covered
        ]
        index.reserve(len(index) + sum(len(r) for packs in files for r in packs.values()) // INDEX_ENTRY.size)
        for packs in files:
            for pack_id, records in packs.items():
                index.add_pack_records(pack_id, records)
        if cache is not None and files:
            cache.save(names, index)
        return index

    def index_cache(self) -> IndexCache | None:
        try:
            return IndexCache(default_directory(), self.config.id, self.crypto)
        except ValueError:
            return None  # an id that cannot name a directory: no cache

    def store_content_addressed(self, name: str, data: bytes) -> None:
        """Store a pack or index file named by the hash of its bytes.  If the name exists, it holds
        these very bytes (unencrypted repositories seal deterministically), so that is success."""
        try:
            self.backend.store(name, data)
        except FileExistsError:
            log.debug("%s already stored", name)

    def invalidate_index(self) -> None:
        self._index = None

    def max_blob_size(self, blob_type: BlobType) -> int:
        if blob_type == BlobType.DATA:
            return self.config.block_size
        return TREE_HEADER.size + self.config.fanout * 32

    def open_blob_at(self, blob_type: BlobType, blob_id: bytes, loc: Location, envelope: bytes) -> bytes:
        what = f"{blob_type.name.lower()} blob {blob_id.hex()[:16]} in pack {loc.pack_id[:16]} at offset {loc.offset}"
        if loc.blob_type != blob_type:
            raise IntegrityError(f"{what}: indexed as {loc.blob_type.name.lower()}")
        if len(envelope) != loc.length:
            raise IntegrityError(f"{what}: pack is truncated")
        return self.crypto.open_blob(blob_type, blob_id, envelope, self.max_blob_size(blob_type), what)

    def locate(self, blob_id: bytes) -> Location:
        loc = self.index.get(blob_id)
        if loc is None:
            raise IntegrityError(f"blob {blob_id.hex()[:16]} is referenced but not in the index")
        return loc

    def load_blob(self, blob_type: BlobType, blob_id: bytes) -> bytes:
        loc = self.locate(blob_id)
        return self._open_or_reread(blob_type, blob_id, loc, self._load_envelope(blob_id, loc))

    def _load_envelope(self, blob_id: bytes, loc: Location) -> bytes:
        try:
            return self.backend.load(pack_name(loc.pack_id), loc.offset, loc.length)
        except ObjectMissing:
            raise IntegrityError(f"pack {loc.pack_id} is missing (needed for blob {blob_id.hex()[:16]})") from None

    def _open_or_reread(self, blob_type: BlobType, blob_id: bytes, loc: Location, envelope: bytes) -> bytes:
        """Open a blob; if it does not verify, read it once more before calling it damaged: a
        second read that is good means the storage or its connection garbled the first (RELIABILITY
        B5), which is worth a warning but not a failed restore."""
        try:
            return self.open_blob_at(blob_type, blob_id, loc, envelope)
        except IntegrityError as first:
            try:
                data = self.open_blob_at(blob_type, blob_id, loc, self._load_envelope(blob_id, loc))
            except IntegrityError:
                raise first from None
        notice = flaky_read_notice(f"pack {loc.pack_id}", f"the blob at offset {loc.offset}")
        log.warning("%s", notice)
        self.flaky_reads.append(notice)
        return data

    def load_blobs(self, blob_type: BlobType, blob_ids: Iterable[bytes], max_gap: int = MAX_GAP) -> dict[bytes, bytes]:
        """Load and verify several blobs, reading each pack once per run of nearby blobs (gaps up to
        ``max_gap`` bytes are read and thrown away rather than paying for another read).

        Raises:
            IntegrityError: naming the pack and offset of anything damaged or missing.
        """
        by_pack: dict[str, list[tuple[Location, bytes]]] = {}
        for blob_id in dict.fromkeys(blob_ids):
            loc = self.locate(blob_id)
            by_pack.setdefault(loc.pack_id, []).append((loc, blob_id))
        out: dict[bytes, bytes] = {}
        for pack_id, items in by_pack.items():
            items.sort(key=lambda it: it[0].offset)
            for run in _nearby_runs(items, max_gap):
                start = run[0][0].offset
                end = max(loc.offset + loc.length for loc, _ in run)
                try:
                    data = self.backend.load(pack_name(pack_id), start, end - start)
                except ObjectMissing:
                    needed = run[0][1].hex()[:16]
                    raise IntegrityError(f"pack {pack_id} is missing (needed for blob {needed})") from None
                view = memoryview(data)
                for loc, blob_id in run:
                    envelope = bytes(view[loc.offset - start : loc.offset - start + loc.length])
                    out[blob_id] = self._open_or_reread(blob_type, blob_id, loc, envelope)
        return out

    def load_tree_node(self, node_id: bytes) -> bytes:
        return self.load_blob(BlobType.TREE, node_id)

    def tree_reader(self, point: Point, load_node: LoadNode | None = None, tolerate_damage: bool = False) -> TreeReader:
        """A reader of ``point``'s volume tree (``load_node`` overrides how nodes are loaded)."""
        load = load_node or self.load_tree_node
        return TreeReader(load, bytes.fromhex(point.root), point.height, point.fanout, point.nblocks, tolerate_damage)

    # --- points ------------------------------------------------------------------------------

    def point_ids(self) -> list[str]:
        return [name.split("/", 1)[1] for name in self.backend.list("points")]

    def load_point(self, point_id: str) -> Point:
        return open_point(self.crypto, point_id, self.backend.load(f"points/{point_id}"))

    def list_points(self, volume: str | None = None) -> list[Point]:
        """Every point (of ``volume``), oldest first.  Raises on any damaged manifest."""
        points = [self.load_point(pid) for pid in self.point_ids()]
        points.sort(key=lambda p: (p.time, p.id))
        return [p for p in points if volume is None or p.volume == volume]

    def scan_points(self, volume: str | None = None) -> tuple[list[Point], list[str]]:
        """Like :meth:`list_points`, but damaged manifests are skipped and described, so one bad
        point never hides the others."""
        points, problems = [], []
        for pid in self.point_ids():
            try:
                points.append(self.load_point(pid))
            except (IntegrityError, UnsupportedFormat) as exc:
                problems.append(f"point {pid}: {exc}")
        points.sort(key=lambda p: (p.time, p.id))
        return [p for p in points if volume is None or p.volume == volume], problems

    def save_point(self, point: Point) -> None:
        self.backend.store(f"points/{point.id}", seal_point(self.crypto, point))

    def delete_point(self, point_id: str, reason: str) -> None:
        """Delete a point's manifest, first leaving a sealed record that umbra deleted it, so that
        other clients can tell a deletion from the storage hiding the point, and a manifest that
        comes back from an old copy is recognised (:mod:`umbra.repo.audit`)."""
        name = f"forgotten/{point_id}"
        doc = {"point": point_id, "reason": reason, "time_ns": time.time_ns()}
        sealed = self.crypto.seal(json.dumps(doc).encode(), AAD_FORGOTTEN + name.encode())
        self.backend.store(name, sealed, replace=True)
        self.backend.delete(f"points/{point_id}")

    def forgotten_ids(self) -> set[str]:
        """Ids of the points umbra deleted (by name: :meth:`forgotten` authenticates a record)."""
        return {name.split("/", 1)[1] for name in self.backend.list("forgotten")}

    def returned_points(self, point_ids: set[str] | None = None) -> set[str]:
        """Points present (of ``point_ids``, default: all) although a record that authenticates
        says umbra deleted them: an old copy put back, or a prune interrupted between its writes."""
        present = set(self.point_ids()) if point_ids is None else point_ids
        return {pid for pid in present & self.forgotten_ids() if self.forgotten(pid) is not None}

    def forgotten(self, point_id: str) -> dict[str, Any] | None:
        """The sealed record of a deleted point, or None if there is none that authenticates."""
        name = f"forgotten/{point_id}"
        try:
            body = self.crypto.open(self.backend.load(name), AAD_FORGOTTEN + name.encode(), name)
            doc = json.loads(body)
        except (ObjectMissing, IntegrityError, ValueError, RecursionError):
            return None
        return doc if isinstance(doc, dict) and doc.get("point") == point_id else None

    def resolve(self, ref: str | PointRef) -> Point:
        """Find the point that a reference names (id prefix, VOLUME@latest, VOLUME@TIME)."""
        parsed = parse_point_ref(ref) if isinstance(ref, str) else ref
        if parsed.volume is None:
            matches = [pid for pid in self.point_ids() if pid.startswith(parsed.id_prefix or "")]
            if not matches:
                raise PointNotFound(ref=parsed.text)
            if len(matches) > 1:
                raise AmbiguousPoint(ref=parsed.text, count=len(matches))
            return self.load_point(matches[0])
        candidates, problems = self.scan_points(parsed.volume)
        for problem in problems:
            log.warning("skipping damaged %s", problem)
        if parsed.time_ns is not None:
            candidates = [p for p in candidates if p.state_time_ns <= parsed.time_ns]
        if not candidates:
            raise PointNotFound(ref=parsed.text)
        return max(candidates, key=lambda p: (p.state_time_ns, p.time))

    # --- verification results (umbra verify) -------------------------------------------------

    def save_verification(self, point_id: str, doc: dict[str, Any]) -> None:
        name = f"verify/{point_id}-{time.time_ns():016x}"
        self.backend.store(name, self.crypto.seal(json.dumps(doc).encode(), AAD_VERIFY + name.encode()))

    def verification_names(self) -> list[str]:
        return list(self.backend.list("verify"))

    @staticmethod
    def verification_point(name: str) -> str:
        """The point a ``verify/<point id>-<time>`` object belongs to."""
        return name.split("/", 1)[1].split("-", 1)[0]

    def load_verification(self, name: str) -> dict[str, Any]:
        body = self.crypto.open(self.backend.load(name), AAD_VERIFY + name.encode(), name)
        try:
            return dict(json.loads(body))
        except (ValueError, TypeError, RecursionError) as exc:
            raise IntegrityError(f"{name}: malformed ({exc})") from None

    def latest_verifications(self) -> dict[str, dict[str, Any]]:
        """The newest stored `umbra verify` result of each point that has one."""
        newest: dict[str, str] = {}
        for name in self.verification_names():  # verify/<point id>-<time, fixed-width hex>
            point_id = self.verification_point(name)
            newest[point_id] = max(newest.get(point_id, ""), name)
        return {point_id: self.load_verification(name) for point_id, name in newest.items()}

    # --- snapshot-set outcomes (backup-complete) ---------------------------------------------

    def save_set_outcome(self, set_id: str, doc: dict[str, Any]) -> None:
        """Record how a snapshot set ended: written after its points, once the writers heard the
        outcome (the points' manifests are already sealed by then)."""
        name = f"sets/{set_id}"
        self.backend.store(name, self.crypto.seal(json.dumps(doc).encode(), AAD_SET + name.encode()))

    def set_outcome_names(self) -> list[str]:
        return list(self.backend.list("sets"))

    def set_outcomes(self) -> dict[str, dict[str, Any]]:
        """Every recorded set outcome, by set id."""
        out: dict[str, dict[str, Any]] = {}
        for name in self.set_outcome_names():
            body = self.crypto.open(self.backend.load(name), AAD_SET + name.encode(), name)
            try:
                out[name.split("/", 1)[1]] = dict(json.loads(body))
            except (ValueError, TypeError, RecursionError) as exc:
                raise IntegrityError(f"{name}: malformed ({exc})") from None
        return out

    # --- keys --------------------------------------------------------------------------------

    def _master(self) -> keys.MasterKey:
        config_digest = blake3.blake3(self.backend.load("config")).hexdigest()
        enc_key = self.crypto._enc_key
        if enc_key is None:
            raise UsageError("this repository is not encrypted: it has no keys")
        return keys.MasterKey(enc_key, self.crypto._id_key, config_digest)

    def add_key(self, passphrase: str, label: str = "") -> str:
        key_id, data = keys.make_key_file(self._master(), self.config.id, passphrase, label)
        self.backend.store(f"keys/{key_id}", data)
        return key_id

    def list_keys(self) -> list[dict[str, Any]]:
        out = []
        for name in self.backend.list("keys"):
            doc = keys.parse_key_file(self.backend.load(name), name)
            out.append(
                {
                    "id": doc["id"],
                    "created": doc.get("created", ""),
                    "host": doc.get("host", ""),
                    "label": doc.get("label", ""),
                    "kdf": doc["kdf"]["algorithm"],
                    "current": doc["id"] == self.key_id,
                }
            )
        return out

    def remove_key(self, key_id: str) -> None:
        names = list(self.backend.list("keys"))
        if f"keys/{key_id}" not in names:
            raise KeyProblem(f"no key {key_id}")
        if len(names) == 1:
            raise KeyProblem("refusing to remove the last key: the repository would be unreadable")
        self.backend.delete(f"keys/{key_id}")

    def change_passphrase(self, new_passphrase: str) -> str:
        """Replace the key in use with one wrapped by ``new_passphrase``; returns the new key id."""
        old = self.key_id
        new_id = self.add_key(new_passphrase)  # the new key exists before the old one goes
        if old is not None:
            self.backend.delete(f"keys/{old}")
        self.key_id = new_id
        return new_id


def _nearby_runs(items: list[tuple[Location, bytes]], max_gap: int) -> Iterator[list[tuple[Location, bytes]]]:
    """Split blobs sorted by offset into runs whose gaps are at most ``max_gap`` bytes."""
    run: list[tuple[Location, bytes]] = []
    for item in items:
        if run and item[0].offset - (run[-1][0].offset + run[-1][0].length) > max_gap:
            yield run
            run = []
        run.append(item)
    if run:
        yield run


def utc_now() -> datetime:
    return datetime.now(UTC)
