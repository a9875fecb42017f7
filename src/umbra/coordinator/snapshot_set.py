"""A snapshot set: several volumes snapshotted at one instant, all or none.

Phases (SPEC section 5): gather writer metadata → select providers → prepare providers → freeze
writers (limit ``freeze_timeout``, retryable vetoes retried) → flush and hold (FIFREEZE, with the
watchdog) → commit all providers (limit ``commit_timeout``) → release (FITHAW, always; for ``hold``
volumes once the backup has read them, within ``hold_limit``) → thaw
writers (always) → ask writers whether they held → [the backup reads the snapshots] →
backup-complete notification → delete the snapshots.  Every phase's outcome and duration is
recorded for the points' manifests.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from umbra.coordinator.freeze import Watchdog, freeze, thaw
from umbra.errors import CoordinatorTimeout, ProviderError, SnapshotSetFailed, UsageError
from umbra.frontends.control import find_protected
from umbra.providers import registry
from umbra.providers.base import Provider, Snapshot
from umbra.volume.extents import Extent
from umbra.volume.fiemap import file_extents
from umbra.volume.iostat import device_to_watch, write_activity
from umbra.volume.mounts import VolumeInfo, filesystem_of, resolve_source
from umbra.writers.base import SetContext, Writer, WriterVeto

log = logging.getLogger(__name__)
T = TypeVar("T")
CONSISTENCY_CLASSES = (
    "application-consistent",
    "filesystem-frozen",
    "inactivity-detected",
    "offline",
    "crash-consistent",
)


@dataclass
class SetOptions:
    freeze_timeout: float = 60.0
    commit_timeout: float = 10.0
    writer_retries: int = 2
    retry_delay: float = 1.0
    providers: list[str] = field(default_factory=list)  # preferred order; empty = priority order
    keep_snapshots: bool = False
    exclude_files: list[str] = field(default_factory=list)  # files whose extents are left out
    quiet_window: float = 0.0  # > 0: wait for this many seconds without writes before the commit
    quiet_timeout: float = 30.0  # ... but no longer than this; then commit anyway (crash-consistent)
    hold_limit: float = 600.0  # hold provider: the longest a filesystem stays frozen for the backup's read
    keep_writable: list[str] = field(default_factory=list)  # paths the backup writes to (the repository)


@dataclass
class Phase:
    name: str
    ok: bool
    duration_s: float
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "duration_s": round(self.duration_s, 4), "error": self.error}


def _with_limit(fn: Callable[[], T], limit: float, phase: str) -> T:
    """Run ``fn`` in a thread; raise CoordinatorTimeout if it does not finish within ``limit``."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    t = threading.Thread(target=target, name=f"umbra-{phase}", daemon=True)
    t.start()
    t.join(limit)
    if t.is_alive():
        raise CoordinatorTimeout(phase=phase, limit=limit)
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


class SnapshotSet:
    def __init__(self, sources: list[str], writers: list[Writer], opts: SetOptions | None = None) -> None:
        self.sources = sources
        self.writers = writers
        self.opts = opts or SetOptions()
        self.set_id = os.urandom(16).hex()
        self.ctx = SetContext(self.set_id, list(sources))
        self.phases: list[Phase] = []
        self.volumes: list[VolumeInfo] = []
        self.providers: list[Provider] = []
        self.snapshots: list[Snapshot] = []
        self.writer_metadata: list[dict[str, Any]] = []
        self._frozen_writers: list[Writer] = []
        self._thawed: list[Writer] = []
        self._froze_fs = False
        self._held = True
        self._holds: dict[str, tuple[int, Watchdog]] = {}  # mount point -> (fd, watchdog): frozen for the read
        self._frozen_at = 0.0
        self.quiet_found = False

    # --- bookkeeping ---------------------------------------------------------------------

    def _phase(self, name: str, fn: Callable[[], T]) -> T:
        t0 = time.monotonic()
        try:
            value = fn()
        except BaseException as exc:
            self.phases.append(Phase(name, False, time.monotonic() - t0, str(exc)))
            raise
        self.phases.append(Phase(name, True, time.monotonic() - t0))
        return value

    @property
    def consistency(self) -> str:
        if self.writers and self._held and self._frozen_writers:
            return "application-consistent"
        if self._froze_fs:
            return "filesystem-frozen"
        if self.quiet_found:
            return "inactivity-detected"
        if self.snapshots and all(s.consistency_hint == "offline" for s in self.snapshots):
            return "offline"
        return "crash-consistent"

    # --- the phases ----------------------------------------------------------------------

    def create(self) -> list[Snapshot]:
        """Take the set.  On any failure everything is undone and the error is raised (its class
        says why: ProviderError, WriterVeto, CoordinatorTimeout, SnapshotSetFailed, SourceError);
        writers that froze are thawed and told the outcome."""
        try:
            self._phase("gather", lambda: self.writer_metadata.extend(w.metadata() for w in self.writers))
            self._phase("select", self._select)
            self._phase("prepare", self._prepare)
            self._phase("freeze-writers", self._freeze_writers)
            if self.opts.quiet_window > 0:
                self._phase("wait-quiet", self._wait_quiet)
                if not self.quiet_found:
                    self.phases[-1].error = "no quiet window within the timeout: crash-consistent"
            self._commit_under_freeze()
            self.ctx.status = "ok"
            self._phase("thaw-writers", self._thaw_writers)
            self._phase("held", self._check_held)
            for s, p in zip(self.snapshots, self.providers, strict=True):
                p.release(s)
                if p.holds_freeze and s.volume.mount is not None:
                    s.finish_read = functools.partial(self._finish_hold, s.volume.mount.mountpoint)
        except BaseException as exc:
            self._fail(exc)
            raise  # the original error keeps its class and exit code; the phase record says where
        return self.snapshots

    def _select(self) -> None:
        self.volumes = [_resolve(s) for s in self.sources]
        self.providers = [registry.select(v, self.opts.providers or None) for v in self.volumes]
        self.ctx.providers = [p.name for p in self.providers]
        self._check_excludes()
        frozen = {v.mount.mountpoint for v in self.volumes if v.mount is not None}
        for v, p in zip(self.volumes, self.providers, strict=True):
            target = p.writes_to(v)
            if target in frozen:
                raise ProviderError(
                    provider=p.name, volume=v.source, reason=f"it writes to {target}, which the set freezes"
                )
        self._check_holds()

    def _held_mounts(self) -> set[str]:
        return {
            v.mount.mountpoint
            for v, p in zip(self.volumes, self.providers, strict=True)
            if v.mount is not None and p.holds_freeze
        }

    def _check_holds(self) -> None:
        """A held filesystem stays frozen while the backup runs: nothing the backup needs to write
        (the repository, temporary files, umbra's own installation) may live on it."""
        held = self._held_mounts()
        if not held:
            return
        needed = [*self.opts.keep_writable, tempfile.gettempdir(), sys.prefix, os.path.dirname(__file__)]
        for path in needed:
            fs = filesystem_of(path)
            if fs is not None and fs.mountpoint in held:
                raise ProviderError(
                    provider="hold",
                    volume=fs.mountpoint,
                    reason=f"{path} is on that filesystem, which would stay frozen while the backup writes there",
                )

    def _wait_quiet(self) -> None:
        """Return once no watched device has written for ``quiet_window`` seconds, or at the timeout
        (then the set is only crash-consistent; the phase record says so)."""
        paths = [p for p in (device_to_watch(v) for v in self.volumes) if p is not None]
        if not paths:
            raise SnapshotSetFailed(phase="wait-quiet", reason="no write counters to watch for these volumes")
        start = last_change = time.monotonic()
        before = [write_activity(p) for p in paths]
        while time.monotonic() - start < self.opts.quiet_timeout:
            time.sleep(min(0.02, self.opts.quiet_window / 10))
            now = [write_activity(p) for p in paths]
            busy = any(n[2] for n in now)  # I/Os in flight
            if now != before or busy:
                before, last_change = now, time.monotonic()
            elif time.monotonic() - last_change >= self.opts.quiet_window:
                self.quiet_found = True
                return
        log.warning(
            "no quiet window of %.1f s within %.1f s: committing anyway",
            self.opts.quiet_window,
            self.opts.quiet_timeout,
        )

    def _prepare(self) -> None:
        for v, p in zip(self.volumes, self.providers, strict=True):
            p.prepare(v, self.set_id)

    def _freeze_writers(self) -> None:
        deadline = time.monotonic() + self.opts.freeze_timeout
        for attempt in range(self.opts.writer_retries + 1):
            try:
                for w in self.writers:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise CoordinatorTimeout(phase="freeze-writers", limit=self.opts.freeze_timeout)
                    _with_limit(lambda w=w: w.freeze(self.ctx), left, "freeze-writers")  # type: ignore[misc]
                    self._frozen_writers.append(w)
                return
            except WriterVeto as veto:
                try:
                    self._thaw_writers()
                finally:
                    self._frozen_writers, self._thawed = [], []
                if not veto.retryable or attempt == self.opts.writer_retries:
                    raise
                log.warning("%s; retrying (%d/%d)", veto, attempt + 1, self.opts.writer_retries)
                time.sleep(self.opts.retry_delay)

    def _commit_under_freeze(self) -> None:
        """Freeze, commit, thaw.  Filesystems of ``hold`` volumes stay frozen after the commit, each
        watched by a watchdog of its own with the hold limit, until :meth:`_finish_hold`."""
        mounts = sorted({v.mount.mountpoint for v in self.volumes if v.mount is not None})
        held = self._held_mounts()
        brief = [m for m in mounts if m not in held]
        fds: dict[str, int] = {}
        watchdog = Watchdog(brief, self.opts.commit_timeout) if brief else None
        hold_dogs = {m: Watchdog([m], self.opts.hold_limit) for m in sorted(held)}
        t0 = time.monotonic()
        committed = False
        try:
            for m in mounts:
                fds[m] = os.open(m, os.O_RDONLY | os.O_DIRECTORY)
                freeze(fds[m])
            self._froze_fs, self._frozen_at = bool(mounts), time.monotonic()
            self.phases.append(Phase("flush-and-hold", True, time.monotonic() - t0))
            self._phase("commit", lambda: _with_limit(self._commit_all, self.opts.commit_timeout, "commit"))
            committed = True
        finally:
            t1 = time.monotonic()
            for m, fd in fds.items():
                if committed and m in held:
                    self._holds[m] = (fd, hold_dogs.pop(m))
                else:
                    thaw(fd)
                    os.close(fd)
            for dog in hold_dogs.values():  # the commit failed: these were thawed just above
                dog.released()
            in_time = watchdog.released() if watchdog else True
            self.phases.append(
                Phase("release", in_time, time.monotonic() - t1, "" if in_time else "watchdog thawed first")
            )
        if not in_time:
            raise CoordinatorTimeout(phase="commit", limit=self.opts.commit_timeout)

    def _finish_hold(self, mountpoint: str) -> dict[str, Any]:
        """The backup has read a held volume: thaw its filesystem.  Raises CoordinatorTimeout if the
        watchdog thawed it first (the hold limit passed, so the image may be torn).  Returns the
        phase record for the point's manifest."""
        if not self._release_hold(mountpoint):
            raise CoordinatorTimeout(phase="hold", limit=self.opts.hold_limit)
        return {"phases": [p.to_dict() for p in self.phases]}

    def _release_hold(self, mountpoint: str) -> bool:
        """Thaw a held filesystem; False if the watchdog had done so already (or it was not held)."""
        fd, dog = self._holds.pop(mountpoint, (-1, None))
        if dog is None:
            return False
        thaw(fd)
        os.close(fd)
        in_time = dog.released()
        error = "" if in_time else f"the watchdog thawed {mountpoint} at the hold limit"
        self.phases.append(Phase("hold", in_time, time.monotonic() - self._frozen_at, error))
        return in_time

    def _release_holds(self) -> None:
        for mountpoint in list(self._holds):
            self._release_hold(mountpoint)

    def _commit_all(self) -> None:
        for v, p in zip(self.volumes, self.providers, strict=True):
            snap = p.commit(v)
            self.snapshots.append(snap)
            snap.exclude_extents = self._exclude_extents(v)  # mapped while frozen: they cannot move

    def _exclude_extents(self, volume: VolumeInfo) -> list[Extent]:
        extents: list[Extent] = []
        for path in self.opts.exclude_files:
            fs = filesystem_of(path)
            if volume.mount is not None and fs is not None and fs.mountpoint == volume.mount.mountpoint:
                extents += file_extents(path)
        return extents

    def _check_excludes(self) -> None:
        mounted = {v.mount.mountpoint for v in self.volumes if v.mount is not None}
        for path in self.opts.exclude_files:
            fs = filesystem_of(path) if os.path.isfile(path) else None
            if fs is None or fs.mountpoint not in mounted:
                raise UsageError(f"--exclude-file {path}: not a file on a mounted filesystem of this set")

    def _thaw_writers(self) -> None:
        """Thaw every frozen writer (each gets its turn even if another fails); then raise the
        first failure, e.g. a writer that never thaws (CoordinatorTimeout)."""
        failures: list[Exception] = []
        for w in reversed(self._frozen_writers):
            try:
                _with_limit(lambda w=w: w.thaw(self.ctx), self.opts.freeze_timeout, "thaw-writers")  # type: ignore[misc]
            except Exception as exc:  # noqa: BLE001 - every writer must get its thaw
                log.error("writer %s did not thaw: %s", w.name, exc)
                failures.append(exc)
        self._thawed = list(self._frozen_writers)
        if failures:
            raise failures[0]

    def backup_components(self) -> dict[str, Any]:
        """The backup components document: what this set selected, for the points' manifests."""
        return {
            "set_id": self.set_id,
            "volumes": [
                {"source": v.source, "device": v.device, "provider": p.name}
                for v, p in zip(self.volumes, self.providers, strict=False)
            ],
            "writers": [
                {"writer": m.get("writer"), "components": m.get("components", [])} for m in self.writer_metadata
            ],
            "excluded_files": list(self.opts.exclude_files),
        }

    def _check_held(self) -> None:
        self._held = all(w.held() for w in self._frozen_writers)
        if not self._held:
            bad = [w.name for w in self._frozen_writers if not w.held()]
            raise SnapshotSetFailed(phase="held", reason=f"writer(s) {', '.join(bad)} did not hold their freeze")

    # --- failure and completion ----------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        self.ctx.status, self.ctx.error = "failed", str(exc)
        self._release_holds()
        for p, v in zip(self.providers, self.volumes, strict=False):
            p.abort(v)
        for s, p in zip(self.snapshots, self.providers, strict=False):
            p.delete(s)
        self.snapshots = []
        frozen = list(self._frozen_writers)
        if frozen and not self._thawed:
            for w in frozen:
                w.snapshot_failed(self.ctx)
            try:
                self._thaw_writers()
            except Exception as exc:  # noqa: BLE001 - already failing; the first error is the one raised
                log.error("while undoing the set: %s", exc)
        for w in frozen:
            w.backup_complete(self.ctx)
        self._frozen_writers = []

    def complete(self, ok: bool, points: list[str], error: str = "") -> dict[str, Any]:
        """The backup of the snapshots is over: tell the writers, then delete the snapshots.

        Returns the set's outcome document (stored in the repository as ``sets/<set id>``, since
        the points' manifests are sealed before the writers hear the outcome)."""
        self._release_holds()  # a backup that failed before reading everything; writers may write now
        self.ctx.status, self.ctx.error, self.ctx.points = ("ok" if ok else "failed"), error, points
        t0 = time.monotonic()
        notified: list[dict[str, Any]] = []
        for w in self._frozen_writers:
            try:
                w.backup_complete(self.ctx)
                notified.append({"writer": w.name, "ok": True, "error": ""})
            except Exception as exc:  # noqa: BLE001 - a notification must not undo a good backup
                log.error("writer %s failed its backup-complete notification: %s", w.name, exc)
                notified.append({"writer": w.name, "ok": False, "error": str(exc)})
        notify_ok = all(n["ok"] for n in notified)
        self.phases.append(
            Phase("backup-complete", notify_ok, time.monotonic() - t0, "" if notify_ok else "a writer failed")
        )
        if not self.opts.keep_snapshots:
            for s, p in zip(self.snapshots, self.providers, strict=True):
                p.delete(s)
        return {
            "set_id": self.set_id,
            "status": self.ctx.status,
            "error": error,
            "points": list(points),
            "consistency": self.consistency,
            "notified": notified,
            "phases": [p.to_dict() for p in self.phases],
            "time_ns": time.time_ns(),
        }


def _resolve(source: str) -> VolumeInfo:
    """A path (mount point, device, image file), or the name of a protected volume."""
    if not os.path.exists(source):
        doc = find_protected(source)
        if doc is not None:  # through its loop device when it has one, so its mount is frozen
            return dataclasses.replace(resolve_source(doc.get("loop") or doc["source"]), source=source)
    return resolve_source(source)
