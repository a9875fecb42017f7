"""Jobs files (TOML): named backup jobs, so a scheduled ``umbra backup --job NAME`` needs no long
command line.  Format and an example: ``docs/JOBS.md``.

The file is found at ``--jobs-file``, else ``$UMBRA_JOBS``, else ``/etc/umbra/jobs.toml``.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any

from umbra.coordinator.snapshot_set import SetOptions
from umbra.engine.backup_set import SetBackupOptions
from umbra.errors import UsageError
from umbra.repo.retention import Policy, parse_duration
from umbra.writers.base import Writer
from umbra.writers.postgres import PostgresWriter
from umbra.writers.script import ScriptWriter
from umbra.writers.sqlite import SQLiteWriter

DEFAULT_JOBS_FILE = "/etc/umbra/jobs.toml"
_SET_KEYS = {f.name for f in fields(SetOptions)}
_JOB_KEYS = {
    "sources",
    "volumes",
    "type",
    "tags",
    "all_blocks",
    "repo",
    "pre_snapshot",
    "post_snapshot",
    "post_backup",
    "sqlite",
    "retention",
} | _SET_KEYS
_RETENTION_KEYS = {f.name for f in fields(Policy)}


@dataclass
class Job:
    name: str
    backup: SetBackupOptions
    repo: str | None = None
    pre_snapshot: str | None = None
    post_snapshot: str | None = None
    post_backup: str | None = None
    sqlite: list[str] = field(default_factory=list)
    retention: Policy | None = None
    postgres: list[str] = field(default_factory=list)

    def writers(self) -> list[Writer]:
        return build_writers(self.pre_snapshot, self.post_snapshot, self.post_backup, self.sqlite, self.postgres)


def build_writers(
    pre_snapshot: str | None,
    post_snapshot: str | None,
    post_backup: str | None,
    sqlite: list[str] | None,
    postgres: list[str] | None = None,
) -> list[Writer]:
    writers: list[Writer] = []
    if pre_snapshot or post_snapshot or post_backup:
        writers.append(ScriptWriter(pre_snapshot, post_snapshot, post_backup))
    if sqlite:
        writers.append(SQLiteWriter(sqlite))
    writers += [PostgresWriter(conninfo) for conninfo in postgres or []]
    return writers


def jobs_file(path: str | None) -> str:
    return path or os.environ.get("UMBRA_JOBS") or DEFAULT_JOBS_FILE


def load_job(name: str, path: str | None = None) -> Job:
    """Read job ``name`` from the jobs file, checking every key.

    Raises:
        UsageError: no such file or job, a TOML syntax error, or an unknown or mistyped key.
    """
    location = jobs_file(path)
    try:
        with open(location, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"no jobs file at {location} (see docs/JOBS.md)") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{location}: {exc}") from None
    defaults = doc.get("defaults", {})
    jobs = doc.get("job", {})
    if name not in jobs:
        raise UsageError(f"{location} has no job {name!r} (jobs: {', '.join(sorted(jobs)) or 'none'})")
    spec: dict[str, Any] = {**defaults, **jobs[name]}
    unknown = set(spec) - _JOB_KEYS
    if unknown:
        raise UsageError(f"job {name!r}: unknown key(s) {', '.join(sorted(unknown))}")
    try:
        set_opts = SetOptions(**{k: spec[k] for k in _SET_KEYS if k in spec})
        sources = list(spec["sources"])
        volumes = list(spec.get("volumes", [os.path.basename(s.rstrip("/")) or "root" for s in sources]))
        backup = SetBackupOptions(
            sources,
            volumes,
            spec.get("type", "full"),
            list(spec.get("tags", [])),
            bool(spec.get("all_blocks", False)),
            set_opts,
        )
        retention = spec.get("retention")
        if retention is not None and set(retention) - _RETENTION_KEYS:
            raise UsageError(
                f"job {name!r}: unknown retention key(s) {', '.join(sorted(set(retention) - _RETENTION_KEYS))}"
            )
        return Job(
            name,
            backup,
            spec.get("repo"),
            spec.get("pre_snapshot"),
            spec.get("post_snapshot"),
            spec.get("post_backup"),
            list(spec.get("sqlite", [])),
            _policy(retention) if retention else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"job {name!r} in {location}: {exc}") from None


def _policy(retention: dict[str, Any]) -> Policy:
    """A retention table; ``keep_within`` as a duration ("30d") or seconds."""
    within = retention.get("keep_within", 0)
    return Policy(**{**retention, "keep_within": parse_duration(str(within))})
