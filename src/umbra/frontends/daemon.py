"""``umbra protect``: the daemon that serves one protected volume and sees every write.

It opens the source exclusively, recovers the journal and the tracking state, then serves the
volume and its snapshots over NBD (always on ``STATE/nbd.sock``, plus any ``--nbd`` address) and,
with ``--fuse``, as FUSE block files; ``--loop`` attaches the FUSE file to a loop device.  A control
socket (``STATE/control.sock``) takes snapshot, release, tracking and status requests.

State directory: ``volume.json`` (what is served where, for other umbra commands), ``running``
(exists while the daemon runs: finding it at start means the last run crashed, so tracking is
invalid and the journal is replayed onto the volume; it names the run's journal and boot id),
``source.json`` (the source's fingerprint and journal at the last clean shutdown),
``tracking.cbt`` (saved on clean shutdown), ``journal/`` (CDP segments), ``difference.spill``
(snapshot copies past the memory limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from umbra.cow.engine import CHECKPOINT_BYTES, CowVolume, SnapshotInfo
from umbra.cow.journal import Journal, JournalGap, boot_id
from umbra.cow.redo import replay_onto
from umbra.cow.ship import Shipper
from umbra.cow.store import DifferenceStore
from umbra.cow.tracking import ChangeTracker
from umbra.errors import JournalCorrupt, ProtectError, UmbraError, UsageError
from umbra.frontends.control import MAX_LINE, encode_error
from umbra.frontends.exports import exports_of
from umbra.frontends.nbd.server import NbdServer
from umbra.frontends.serve import run_loop
from umbra.repo import cdp
from umbra.repo.pointref import format_ns
from umbra.repo.repository import Repository
from umbra.testing_knobs import testonly_enabled
from umbra.volume.backing import Backing, open_backing
from umbra.volume.extents import merge
from umbra.volume.source import FileSource
from umbra.volume.usedmap import build_used_map

log = logging.getLogger("umbra.protect")


@dataclass
class ProtectOptions:
    source: str
    name: str
    state_dir: Path
    nbd: list[str] = field(default_factory=list)
    fuse_dir: Path | None = None
    loop: bool = False
    sync: bool = False
    chunk_size: int = 64 * 1024
    memory_limit: int = 256 << 20
    store_limit: int | None = None  # default: the volume's size
    journal: bool = True
    journal_max: int | None = None
    journal_min_free: int = 0  # bytes the journal leaves free on its filesystem
    journal_cut_damaged: bool = False  # cut damage in the middle of the journal off (a gap)
    journal_direct: bool = True
    commit_interval: float = 0.05
    repo: Repository | None = None  # ship the journal into this repository
    ship_interval: float = 0.25


def iso(ns: int) -> str:
    return format_ns(ns, 3)


class ProtectDaemon:
    def __init__(self, opts: ProtectOptions) -> None:
        self.opts = opts
        self.state = opts.state_dir
        self.backing: Backing | None = None
        self.volume: CowVolume | None = None
        self.journal: Journal | None = None
        self.tracker: ChangeTracker | None = None
        self.shipper: Shipper | None = None
        self.nbd: NbdServer | None = None
        self.nbd_addresses: list[str] = []
        self.fuse: Any = None  # umbra.frontends.fuse_blocks.FuseBlockFiles when --fuse
        self.loop_device: str | None = None
        self.started = time.time()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._control: asyncio.Server | None = None

    # --- life cycle ----------------------------------------------------------------------------

    def open(self) -> None:
        """Take the source and recover state; raises before anything is served."""
        opts = self.opts
        self.state.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.backing = open_backing(opts.source)
        try:
            nchunks = -(-self.backing.size // opts.chunk_size)
            fingerprint = _fingerprint(self.backing)
            marker = _read_marker(self.state / "running")  # left behind: the last run crashed
            crashed = marker is not None
            last_run = self._last_clean_run()
            self.tracker = ChangeTracker.load(self.state / "tracking.cbt", self.state / "running", nchunks, fingerprint)
            if self.tracker.invalidated:
                log.warning("changed-block tracking reset: %s", self.tracker.invalidated)
            kept = self._load_snapshots(crashed, fingerprint, nchunks)
            if opts.journal:
                self.journal = Journal.open(
                    self.state / "journal",
                    self.backing.size,
                    commit_interval=opts.commit_interval,
                    max_bytes=opts.journal_max,
                    direct=opts.journal_direct,
                    min_free=opts.journal_min_free,
                    resume_free=max(opts.journal_min_free, 4 << 20),  # a gap ends with twice the floor free
                    cut_damaged=opts.journal_cut_damaged,
                )
                torn = self.journal.stats().recovered_tail_bytes
                if torn:
                    log.warning("journal: cut a torn tail of %d bytes", torn)
                self._recover_journal(self.journal, marker, last_run, fingerprint)
                if opts.repo is not None:
                    _never_reuse_shipped(self.journal, opts.repo)
                    self.shipper = Shipper(self.journal, opts.repo, opts.name, interval=opts.ship_interval)
            elif opts.repo is not None:
                raise UsageError("shipping to a repository needs the journal (drop --no-journal)")
            elif marker is not None and marker.get("journal"):
                self._redo_without_journaling(marker["journal"])
            marker_doc = {
                "pid": os.getpid(),
                "boot_id": boot_id(),
                "journal": self.journal.id if self.journal else None,
            }
            (self.state / "running").write_text(json.dumps(marker_doc) + "\n")
            limit = opts.store_limit or max(self.backing.size, 1 << 20)
            if kept is not None:
                store = DifferenceStore.reopen(kept["store"], self.state, opts.memory_limit, limit)
            else:
                store = DifferenceStore(opts.chunk_size, self.state, opts.memory_limit, limit)
            checkpoint_bytes = CHECKPOINT_BYTES
            if opts.journal_max:  # records past the checkpoint are kept: checkpoint well before the limit
                checkpoint_bytes = min(checkpoint_bytes, max(opts.journal_max // 2, 1 << 20))
            self.volume = CowVolume(
                self.backing,
                store,
                opts.chunk_size,
                self.tracker,
                self.journal,
                opts.name,
                sync=opts.sync,
                checkpoint_bytes=checkpoint_bytes,
                flush_marks=testonly_enabled("FLUSH_MARKS"),
            )
            if kept is not None:
                self.volume.import_snapshots(kept["snapshots"])
                log.warning("kept %d snapshots from the last run", len(kept["snapshots"]))
        except BaseException:
            self._close_storage()
            raise

    async def serve(self, ready: Callable[[dict[str, Any]], None] | None = None) -> None:
        assert self.volume is not None
        self._stop = asyncio.Event()
        loop = self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            volume = self.volume
            self.nbd = NbdServer(lambda: exports_of(volume), volume.name)
            for address in [f"unix:{self.state / 'nbd.sock'}", *self.opts.nbd]:
                try:
                    self.nbd_addresses.append(await self.nbd.listen(address))
                except (OSError, ValueError) as exc:
                    reason = f"cannot serve NBD at {address}: {getattr(exc, 'strerror', None) or exc}"
                    raise ProtectError(volume=self.opts.name, reason=reason) from exc
            control_path = self.state / "control.sock"
            with contextlib.suppress(FileNotFoundError):
                control_path.unlink()
            self._control = await asyncio.start_unix_server(self._control_client, str(control_path), limit=MAX_LINE)
            os.chmod(control_path, 0o600)
            if self.opts.fuse_dir is not None:
                await loop.run_in_executor(None, self._start_fuse)
            self._write_volume_json()
            if self.shipper is not None:
                self.shipper.start()
            if ready is not None:
                ready(self.describe())
            await self._stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self._shutdown()

    def _start_fuse(self) -> None:
        from umbra.frontends.fuse_blocks import FuseBlockFiles

        assert self.volume is not None and self.opts.fuse_dir is not None
        volume = self.volume
        self.fuse = FuseBlockFiles(lambda: exports_of(volume), self.opts.fuse_dir, volume.name)
        self.fuse.start()
        if self.opts.loop:
            self.loop_device = self.fuse.attach_loop()

    async def _shutdown(self) -> None:
        if self._control is not None:
            self._control.close()
            with contextlib.suppress(FileNotFoundError):
                (self.state / "control.sock").unlink()
        if self.nbd is not None:
            await self.nbd.close()
            self.nbd.executor.shutdown()
        if self.fuse is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.fuse.stop)
        self.close()

    def close(self) -> None:
        """Clean shutdown: everything durable, tracking saved, the running marker removed."""
        if self.volume is None:
            return
        self.volume.stop()  # a last checkpoint: the volume durable on its own
        if self.shipper is not None:
            self.shipper.stop(drain=True)  # what is still pending stays in the local journal
            self.shipper = None
        if self.journal is not None:
            self.journal.close()
        assert self.backing is not None
        fingerprint = _fingerprint(self.backing)
        if self.tracker is not None:
            self.tracker.save(self.state / "tracking.cbt", fingerprint)
        journal_id = self.journal.id if self.journal is not None else None
        _write_json(self.state / "source.json", {"fingerprint": fingerprint, "journal": journal_id})
        snapshots = self.volume.export_snapshots()
        if snapshots:
            doc = {
                "fingerprint": fingerprint,
                "chunk_size": self.volume.chunk_size,
                "nchunks": self.volume.nchunks,
                "store": self.volume.store.persist(),
                "snapshots": snapshots,
            }
            _write_json(self.state / "snapshots.json", doc)
        self.volume.close(keep_store=bool(snapshots))
        (self.state / "running").unlink(missing_ok=True)
        (self.state / "volume.json").unlink(missing_ok=True)
        self._close_storage()
        self.volume = None

    def _last_clean_run(self) -> dict[str, Any] | None:
        """What the last clean shutdown noted (the source's fingerprint, its journal's id)."""
        path = self.state / "source.json"
        try:
            doc: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        path.unlink()  # from now on only a clean shutdown writes it again
        return doc

    def _recover_journal(
        self, journal: Journal, marker: dict[str, Any] | None, last_run: dict[str, Any] | None, fingerprint: str
    ) -> None:
        """Bring the journal and the volume into agreement after the last run: replay the journal
        onto the volume after a crash (redo), and record a gap where writes may be missing from it."""
        previous = (marker or last_run or {}).get("journal", journal.id)
        if last_run is not None and last_run.get("fingerprint") != fingerprint:
            log.warning("the source was modified while it was not protected: the journal records a gap")
            journal.mark_gap("the source was modified while it was not protected")
        elif previous != journal.id:
            journal.mark_gap("the volume was served without this journal (--no-journal)")
        if marker is None or marker.get("journal") != journal.id:
            return
        self._redo(journal)
        if marker.get("boot_id") != boot_id() and not self.opts.sync:
            journal.mark_gap(
                "the machine stopped while the volume was protected (power loss or kernel crash): "
                "writes not yet durable in the journal may be missing from it"
            )

    def _redo(self, journal: Journal) -> None:
        assert self.backing is not None
        redo = replay_onto(journal, self.backing)
        if redo.skipped:
            log.warning("journal: not replayed onto the volume after the crash: %s", redo.skipped)
        else:
            log.warning(
                "journal: replayed %d writes (%d bytes) onto the volume after the crash", redo.records, redo.bytes
            )

    def _redo_without_journaling(self, journal_id: str) -> None:
        """Started with ``--no-journal`` after a journaled run crashed: its flushed writes may be
        durable only in that journal (the volume is made durable at checkpoints), so replay it."""
        assert self.backing is not None
        try:
            journal = Journal.open(self.state / "journal", self.backing.size)
        except JournalCorrupt as exc:
            log.error("journal: cannot replay it onto the volume (flushed writes may be missing): %s", exc)
            return
        try:
            if journal.id == journal_id:
                self._redo(journal)
        finally:
            journal.close()

    def _load_snapshots(self, crashed: bool, fingerprint: str, nchunks: int) -> dict[str, Any] | None:
        """Snapshots saved by the last clean shutdown, if they still describe this source."""
        path = self.state / "snapshots.json"
        if not path.exists():
            return None
        try:
            doc: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            doc = {}
        path.unlink()  # from now on only a clean shutdown writes it again
        problem = None
        if crashed:
            problem = "the daemon did not shut down cleanly"
        elif doc.get("fingerprint") != fingerprint:
            problem = "the source was modified while it was not protected"
        elif doc.get("chunk_size") != self.opts.chunk_size or doc.get("nchunks") != nchunks:
            problem = "the chunk size or the volume size changed"
        if problem is not None:
            log.warning("dropping the snapshots of the last run: %s", problem)
            return None
        return doc

    def _close_storage(self) -> None:
        if self.journal is not None and self.volume is None:
            self.journal.close()
        if self.backing is not None:
            self.backing.close()
            self.backing = None

    def _write_volume_json(self) -> None:
        doc = {
            "name": self.opts.name,
            "source": os.path.abspath(self.opts.source),
            "pid": os.getpid(),
            "nbd": self.nbd_addresses,
            "fuse": str(self.fuse.image_path()) if self.fuse else None,
            "loop": self.loop_device,
            "host": socket.gethostname(),
        }
        _write_json(self.state / "volume.json", doc)

    # --- control -----------------------------------------------------------------------------

    async def _control_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # a client that hangs up or sends an endless line just gets closed
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            try:
                reply = await self._answer(await reader.readline())
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
            finally:
                writer.close()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            op = str(request.pop("op"))
            handler = getattr(self, "op_" + op.replace("-", "_"), None)
            if handler is None:
                raise UsageError(f"unknown control request {op!r}")
            result = await asyncio.get_running_loop().run_in_executor(None, lambda: handler(**request))
            return {"ok": result}
        except (ValueError, KeyError, TypeError) as exc:
            return encode_error(UsageError(f"malformed control request: {exc}"))
        except Exception as exc:  # noqa: BLE001 - returned to the client
            return encode_error(exc)

    def _vol(self) -> CowVolume:
        if self.volume is None:
            raise ProtectError(volume=self.opts.name, reason="shutting down")
        return self.volume

    def _snapshot_doc(self, info: SnapshotInfo) -> dict[str, Any]:
        vol = self._vol()
        doc = asdict(info)
        doc["created"] = iso(info.created_ns)
        doc["journal"] = self.journal.id if self.journal is not None else None
        doc["export"] = f"{vol.name}@{info.name}"
        doc["nbd"] = f"nbd+unix:///{vol.name}@{info.name}?socket={self.state / 'nbd.sock'}"
        doc["fuse"] = str(self.fuse.image_path(f"{self.opts.name}@{info.name}")) if self.fuse else None
        doc["protected_bytes"] = info.protected_chunks * vol.chunk_size
        doc["copied_bytes"] = info.copied_chunks * vol.chunk_size
        return doc

    def op_status(self) -> dict[str, Any]:
        return self.describe()

    def describe(self) -> dict[str, Any]:
        vol = self._vol()
        store = vol.store.stats()
        tracker = self.tracker
        return {
            "volume": vol.name,
            "source": os.path.abspath(self.opts.source),
            "size": vol.size,
            "chunk_size": vol.chunk_size,
            "pid": os.getpid(),
            "started": iso(int(self.started * 1e9)),
            "sync": self.opts.sync,
            "writes": vol.writes,
            "bytes_written": vol.bytes_written,
            "nbd": self.nbd_addresses,
            "fuse": str(self.fuse.image_path()) if self.fuse else None,
            "loop": self.loop_device,
            "state": str(self.state),
            "tracking": {
                "generations": list(tracker.generations) if tracker else [],
                "invalidated": tracker.invalidated if tracker else "tracking disabled",
            },
            "difference_store": asdict(store),
            "snapshots": [self._snapshot_doc(s) for s in vol.snapshots()],
            "journal": self.op_journal(),
        }

    def op_snapshot_create(self, name: str, used: str = "all") -> dict[str, Any]:
        """``used="fs"``: protect only blocks the filesystem uses (call it only while it is frozen)."""
        vol = self._vol()
        extents = None
        if used == "fs":
            assert self.backing is not None
            src = FileSource(self.backing.path, self.backing.fd, self.backing.size, self.backing.is_block_device)
            extents = merge(build_used_map(src).extents)
        elif used != "all":
            raise UsageError("used must be 'all' or 'fs'")
        info = vol.create_snapshot(name, extents)
        if self.fuse is not None:
            self.fuse.refresh()
        return self._snapshot_doc(info)

    def op_bookmark(self, name: str, snapshot: str, consistency: str, set_id: str) -> dict[str, Any]:
        """Mark the journal with a named bookmark for the instant of ``snapshot`` (taken by the
        coordinator while the set was frozen: that instant is the consistent one)."""
        if self.journal is None:
            raise UsageError(f"{self.opts.name} keeps no journal (--no-journal): bookmarks need one")
        info = self._vol().snapshot(snapshot)
        fields = {"time_ns": info.created_ns, "seq": info.journal_seq, "consistency": consistency, "set_id": set_id}
        self.journal.append_mark("bookmark", name, **fields)
        if self.shipper is not None:
            self.shipper.kick()
        return {"name": name, "volume": self.opts.name, "journal": self.journal.id, **fields}

    def op_snapshot_list(self) -> list[dict[str, Any]]:
        return [self._snapshot_doc(s) for s in self._vol().snapshots()]

    def op_snapshot_delete(self, name: str) -> None:
        self._vol().delete_snapshot(name)
        if self.fuse is not None:
            self.fuse.refresh()

    def op_release(self, name: str, extents: list[list[int]]) -> int:
        vol = self._vol()
        return sum(vol.release(name, start, end - start) for start, end in extents)

    def op_changed(self, name: str, since: str) -> list[list[int]] | None:
        """Byte extents written between the snapshot that started generation ``since`` and ``name``."""
        vol = self._vol()
        bitmap = vol.changed_chunks(name, since)
        if bitmap is None:
            return None
        cs = vol.chunk_size
        return [[a * cs, min(b * cs, vol.size)] for a, b in bitmap.runs()]

    def op_journal(self) -> dict[str, Any] | None:
        if self.journal is None:
            return None
        st = self.journal.stats()
        span = (st.last_ns - st.first_ns) / 1e9 if st.first_ns and st.last_ns else 0.0
        shipping = self.shipper.status() if self.shipper is not None else None
        return {
            "segments": st.segments,
            "records": st.records,
            "bytes": st.bytes,
            "first": iso(st.first_ns) if st.first_ns else None,
            "last": iso(st.last_ns) if st.last_ns else None,
            "write_bytes": st.write_bytes,
            "write_rate": round(st.write_bytes / span, 1) if span > 0 else None,
            "recovered_tail_bytes": st.recovered_tail_bytes,
            "gap": _gap_doc(self.journal.gap),
            "gaps_recorded": self.journal.gaps_recorded,
            "sync": self.opts.sync,
            "id": self.journal.id,
            "shipping": asdict(shipping) if shipping is not None else None,
            # over --journal-max only because records wait to be shipped: the history cannot be kept
            "over_limit": bool(
                self.journal.max_bytes and st.bytes > self.journal.max_bytes and shipping and shipping.pending_records
            ),
        }

    def op_stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)


def _never_reuse_shipped(journal: Journal, repo: Repository) -> None:
    """If the repository holds records of this journal that the local journal lost (a power cut
    before they were durable, a damaged part cut off), go on after them with a gap: a sequence
    number already shipped must never name another write."""
    try:
        shipped = max((ref.last_seq for ref in cdp.list_batches(repo, journal.id)), default=0)
    except (UmbraError, OSError) as exc:
        log.warning("journal: could not compare with the repository at start (%s)", exc)
        return
    if shipped > journal.last_seq:
        journal.mark_gap(
            f"records {journal.last_seq + 1}..{shipped} were shipped but are missing from the local journal",
            next_seq=shipped + 1,
        )


def _read_marker(path: Path) -> dict[str, Any] | None:
    """The running marker of a run that did not shut down cleanly (None: there is none)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    return doc if isinstance(doc, dict) else {"pid": text.strip()}  # before 2026-12: no journal named


def _gap_doc(gap: JournalGap | None) -> dict[str, Any] | None:
    if gap is None:
        return None
    return {**gap.to_dict(), "since": format_ns(gap.since_ns), "noticed": iso(gap.noticed_ns)}


def _fingerprint(backing: Backing) -> str:
    """What identifies the source's contents between runs (files: size, mtime, inode)."""
    st = os.fstat(backing.fd)
    if backing.is_block_device:
        return f"device:{backing.size}"
    return f"file:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_daemon(opts: ProtectOptions, ready: Callable[[dict[str, Any]], None] | None = None) -> None:
    daemon = ProtectDaemon(opts)
    daemon.open()
    try:
        run_loop(daemon.serve(ready))
    finally:
        daemon.close()
