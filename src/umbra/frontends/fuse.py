"""pyfuse3 mounts (the file trees of :mod:`umbra.frontends.fuse_tree`).

pyfuse3 runs its trio loop in a thread of its own; handlers hand slow work to worker threads
(``trio.to_thread``).  Block files, where every write of a loop device passes, speak the kernel's
protocol directly instead (:mod:`umbra.frontends.fuse_blocks`).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading

import pyfuse3
import trio

from umbra.errors import ServeError

FUSE_WORKERS = 16


class FuseMount:
    """One pyfuse3 mount served from a thread of its own (pyfuse3 allows one per process)."""

    def __init__(
        self, ops: pyfuse3.Operations, directory: os.PathLike[str] | str, name: str, read_only: bool = False
    ) -> None:
        self.ops = ops
        self.name = name  # the mount's fsname (and, for block files, the default export)
        self.directory = os.fspath(directory)
        self.read_only = read_only
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def _prepare(self) -> None:
        """Runs just before the loop starts (block files list their exports here)."""

    def start(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        options = set(pyfuse3.default_options) | {f"fsname=umbra-{self.name}", "subtype=umbra"}
        if self.read_only:
            options.add("ro")
        try:
            pyfuse3.init(self.ops, self.directory, options)
        except RuntimeError as exc:
            raise ServeError(name=self.name, reason=f"cannot mount FUSE at {self.directory}: {exc}") from exc
        self._prepare()
        self._thread = threading.Thread(target=self._run, name="umbra-fuse", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise ServeError(name=self.name, reason=f"FUSE failed: {self._error}")

    def _run(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._started.set()
            await pyfuse3.main(min_tasks=4, max_tasks=FUSE_WORKERS)

        try:
            trio.run(main)
        except BaseException as exc:  # noqa: BLE001 - reported by start() or stop()
            self._error = exc
            self._started.set()

    @property
    def running(self) -> bool:
        """False once the FUSE loop has ended (for example after ``umount`` from outside)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        if self._token is not None and self._thread is not None and self._thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):  # it ended on its own meanwhile
                trio.from_thread.run_sync(pyfuse3.terminate, trio_token=self._token)
            self._thread.join(timeout=30)
        try:
            pyfuse3.close(unmount=True)
        except (RuntimeError, OSError):
            subprocess.run(["umount", "-l", self.directory], capture_output=True, check=False)
        self._token = None
