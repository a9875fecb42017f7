"""Backing up a snapshot set: the coordinator takes the set, each snapshot becomes a point (all
sharing the set id, consistency class and phase record), then writers hear the outcome and the
snapshots are deleted."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from umbra.coordinator.snapshot_set import SetOptions, SnapshotSet
from umbra.engine import backup
from umbra.engine.progress import Progress
from umbra.errors import UmbraError, UsageError
from umbra.repo.repository import Repository
from umbra.writers.base import Writer


@dataclass
class SetBackupOptions:
    sources: list[str]
    volumes: list[str]
    type: str = "full"
    tags: list[str] = field(default_factory=list)
    all_blocks: bool = False
    set_options: SetOptions = field(default_factory=SetOptions)


def run(
    repo: Repository, opts: SetBackupOptions, writers: list[Writer], progress: Progress | None = None
) -> list[backup.BackupResult]:
    """Take one snapshot set of ``opts.sources`` and back every snapshot up as a point.

    Raises:
        SnapshotSetFailed, CoordinatorTimeout, ProviderError, WriterError: the set failed and
        nothing was kept; or any backup error (then writers are told the backup failed).
    """
    if len(opts.sources) != len(opts.volumes):
        raise UsageError("give one --volume name for each source")
    if len(set(opts.volumes)) != len(opts.volumes):
        raise UsageError("volume names in one snapshot set must differ")
    set_options = opts.set_options
    repo_path = repo.backend.local_path()
    if repo_path is not None:  # a held filesystem must not be the one the backup writes to
        set_options = dataclasses.replace(set_options, keep_writable=[*set_options.keep_writable, repo_path])
    snapshot_set = SnapshotSet(opts.sources, writers, set_options)
    snapshots = snapshot_set.create()
    results: list[backup.BackupResult] = []
    try:
        for snap, volume in zip(snapshots, opts.volumes, strict=True):
            annotations = {
                "set_id": snapshot_set.set_id,
                "consistency": snapshot_set.consistency,
                "provider": snap.provider,
                "phases": [p.to_dict() for p in snapshot_set.phases],
                "writers": snapshot_set.writer_metadata,
                "components": snapshot_set.backup_components(),
            }
            if snap.cdp:
                annotations["cdp"] = snap.cdp
            bopts = backup.BackupOptions(
                snap.path,
                volume,
                opts.type,
                list(opts.tags),
                opts.all_blocks,
                display_source=snap.volume.source,
                annotations=annotations,
                exclude_extents=snap.exclude_extents,
                tracking_generation=snap.tracking_generation,
                changed_since=snap.changed_since,
                on_read=snap.on_read,
                finish_read=snap.finish_read,
                content=snap.content,
            )
            results.append(backup.run(repo, bopts, progress))
    except BaseException as exc:
        outcome = snapshot_set.complete(False, [r.point.id for r in results], str(exc))
        if results:  # points of the set's earlier volumes are stored: say how the set ended
            with contextlib.suppress(UmbraError):
                _record(repo, outcome)
        raise
    _record(repo, snapshot_set.complete(True, [r.point.id for r in results]))
    return results


def _record(repo: Repository, outcome: dict[str, Any]) -> None:
    """Store the set's outcome (backup-complete included) under the shared lock, so a prune that
    runs meanwhile cannot miss it."""
    with repo.lock(exclusive=False):
        repo.save_set_outcome(outcome["set_id"], outcome)
