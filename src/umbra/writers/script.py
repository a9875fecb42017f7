"""The script writer: user commands before the snapshot, after it, and after the backup, with
exactly the control flow of seed 004 ("Run during backup"):

1. the pre-snapshot command runs; a non-zero exit aborts everything (no other command runs);
2. the snapshot is taken; if that fails, the post-snapshot and post-backup commands still run,
   with the error in ``UMBRA_STATUS``/``UMBRA_ERROR``, and the backup aborts;
3. otherwise the post-snapshot command runs, and whatever it returns the backup goes on;
4. the post-backup command runs last, with the outcome and the points made (``UMBRA_POINT``).

Every command gets ``UMBRA_PHASE``, ``UMBRA_VOLUMES``, ``UMBRA_PROVIDER``, ``UMBRA_STATUS``,
``UMBRA_ERROR``, ``UMBRA_POINT`` and ``UMBRA_SET``.
"""

from __future__ import annotations

import logging
import os
import subprocess
from typing import Any

from umbra.writers.base import SetContext, Writer, WriterVeto

log = logging.getLogger(__name__)


class ScriptWriter(Writer):
    name = "script"

    def __init__(
        self,
        pre_snapshot: str | None = None,
        post_snapshot: str | None = None,
        post_backup: str | None = None,
        timeout: float = 600,
    ) -> None:
        self.pre_snapshot, self.post_snapshot, self.post_backup = pre_snapshot, post_snapshot, post_backup
        self.timeout = timeout
        self.history: list[tuple[str, int]] = []  # (phase, exit code), for the manifest
        self._snapshot_failed = False

    def metadata(self) -> dict[str, Any]:
        return {
            "writer": self.name,
            "commands": {
                "pre-snapshot": self.pre_snapshot,
                "post-snapshot": self.post_snapshot,
                "post-backup": self.post_backup,
            },
            "components": [],
            "restore_method": "none: commands only coordinate the application",
        }

    def _run(self, phase: str, command: str | None, ctx: SetContext) -> int:
        if not command:
            return 0
        env = dict(os.environ)
        env.update(
            UMBRA_PHASE=phase,
            UMBRA_SET=ctx.set_id,
            UMBRA_VOLUMES=" ".join(ctx.volumes),
            UMBRA_PROVIDER=" ".join(ctx.providers),
            UMBRA_STATUS=ctx.status,
            UMBRA_ERROR=ctx.error,
            UMBRA_POINT=" ".join(ctx.points),
        )
        try:
            code = subprocess.run(command, shell=True, env=env, timeout=self.timeout, check=False).returncode
        except subprocess.TimeoutExpired:
            code = 124
        self.history.append((phase, code))
        if code:
            log.warning("%s command exited with %d: %s", phase, code, command)
        return code

    def freeze(self, ctx: SetContext) -> None:
        code = self._run("pre-snapshot", self.pre_snapshot, ctx)
        if code:
            raise WriterVeto(self.name, f"the pre-snapshot command exited with {code}")

    def snapshot_failed(self, ctx: SetContext) -> None:
        self._snapshot_failed = True

    def thaw(self, ctx: SetContext) -> None:
        self._run("post-snapshot", self.post_snapshot, ctx)  # its result never stops the backup

    def backup_complete(self, ctx: SetContext) -> None:
        self._run("post-backup", self.post_backup, ctx)
