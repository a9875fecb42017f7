"""The PostgreSQL writer.

A PostgreSQL cluster whose data directory (and WAL, and tablespaces) are captured at one instant is
consistent: on start, PostgreSQL replays its WAL exactly as after a power failure, and that recovery
is what the database guarantees.  So the writer's job is to make that instant cheap and safe:

* metadata: the data directory, WAL directory and tablespaces, read from the server;
* freeze: refuse (fatal veto) unless every one of those paths is on a volume of the set, then
  ``CHECKPOINT`` so that recovery after a restore has little WAL to replay;
* thaw: nothing is paused, so nothing to resume (``held`` is always true: atomicity comes from the
  set being one instant, with the filesystems frozen);
* backup-complete: ``RAISE LOG`` of the outcome and the point ids into the server log, after the
  points are committed (archive or log-truncation hooks can follow that line).

It uses the ``psql`` client with a libpq connection string, so no Python driver is needed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

from umbra.volume.mounts import filesystem_of, resolve_source
from umbra.writers.base import SetContext, Writer, WriterVeto


class PostgresWriter(Writer):
    name = "postgresql"

    def __init__(self, conninfo: str, psql: str | None = None, timeout: float = 60) -> None:
        self.conninfo = conninfo
        self.psql = psql or shutil.which("psql") or "psql"
        self.timeout = timeout
        self._paths: dict[str, str] | None = None

    def _query(self, sql: str) -> str:
        try:
            proc = subprocess.run(
                [self.psql, self.conninfo, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql],
                capture_output=True,
                text=True,
                timeout=self.timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise WriterVeto(self.name, f"cannot run psql: {exc}", retryable=True) from exc
        if proc.returncode != 0:
            raise WriterVeto(self.name, f"psql failed: {proc.stderr.strip()}", retryable=True)
        return proc.stdout.strip()

    def paths(self) -> dict[str, str]:
        if self._paths is None:
            data = self._query("SHOW data_directory")
            paths = {"data_directory": data, "wal_directory": os.path.realpath(os.path.join(data, "pg_wal"))}
            for row in self._query("SELECT spcname, pg_tablespace_location(oid) FROM pg_tablespace").splitlines():
                name, _, location = row.partition("|")
                if location:
                    paths[f"tablespace {name}"] = location
            self._paths = paths
        return self._paths

    def metadata(self) -> dict[str, Any]:
        paths = self.paths()
        return {
            "writer": self.name,
            "server_version": self._query("SHOW server_version"),
            "components": [{"name": "cluster", "files": sorted(set(paths.values()))}],
            "paths": paths,
            "restore_method": "restore every volume of the set, then start PostgreSQL: it replays its WAL",
        }

    def freeze(self, ctx: SetContext) -> None:
        set_mounts = set()
        for source in ctx.volumes:
            info = resolve_source(source)
            if info.mount is not None:
                set_mounts.add(info.mount.mountpoint)
        for role, path in self.paths().items():
            fs = filesystem_of(path)
            if fs is None or fs.mountpoint not in set_mounts:
                raise WriterVeto(self.name, f"the {role} {path} is not on a volume of this snapshot set")
        self._query("CHECKPOINT")

    def thaw(self, ctx: SetContext) -> None:
        return None

    def backup_complete(self, ctx: SetContext) -> None:
        message = f"umbra backup complete: set {ctx.set_id} status {ctx.status} points {' '.join(ctx.points) or '-'}"
        self._query(f"DO $$ BEGIN RAISE LOG '{message}'; END $$")
