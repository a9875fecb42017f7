"""The SQLite writer: named database files are made consistent for the snapshot.

Freeze: checkpoint the WAL into the database (``wal_checkpoint(TRUNCATE)``), then take the write
lock (``BEGIN IMMEDIATE``) so no transaction can commit until the thaw; the filesystem freeze that
follows flushes everything to disk.  Thaw: release the lock.  ``held`` is true if the lock was
held from freeze to thaw.  A restored database passes ``PRAGMA integrity_check``.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from umbra.writers.base import SetContext, Writer, WriterVeto


class SQLiteWriter(Writer):
    name = "sqlite"

    def __init__(self, databases: list[str], busy_timeout: float = 30) -> None:
        self.databases = databases
        self.busy_timeout = busy_timeout
        self._conns: list[sqlite3.Connection] = []
        self._held = False

    def metadata(self) -> dict[str, Any]:
        files = []
        for db in self.databases:
            files += [db, db + "-wal", db + "-shm"]
        return {
            "writer": self.name,
            "components": [{"name": db, "files": [db, db + "-wal"]} for db in self.databases],
            "files": files,
            "excludes": [db + "-shm" for db in self.databases],
            "restore_method": "restore the volume; SQLite recovers from the restored WAL on first open",
        }

    def freeze(self, ctx: SetContext) -> None:
        try:
            for db in self.databases:
                # freeze and thaw run on different threads of the coordinator, one after the other
                conn = sqlite3.connect(db, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
                self._conns.append(conn)
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self.thaw(ctx)
            raise WriterVeto(self.name, f"cannot lock {db}: {exc}", retryable=True) from exc
        self._held = True

    def thaw(self, ctx: SetContext) -> None:
        for conn in self._conns:
            try:
                self._held = self._held and conn.in_transaction
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                self._held = False
            finally:
                conn.close()
        self._conns = []

    def held(self) -> bool:
        return self._held
