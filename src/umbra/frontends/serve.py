"""Serve fixed block exports (points of the repository, overlays) over NBD and FUSE until told to
stop: SIGTERM, SIGINT, or the FUSE mount being unmounted from outside (``umount DIR``)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import uvloop

from umbra.errors import ServeError
from umbra.frontends.exports import BlockExport
from umbra.frontends.nbd.server import NbdServer
from umbra.volume.filesystem import FileTree

POLL_S = 0.2


@dataclass
class ServeOptions:
    exports: dict[str, BlockExport]
    default_export: str
    nbd: list[str] = field(default_factory=list)
    fuse_dir: str | None = None  # block files of the exports here ...
    fuse_tree: FileTree | None = None  # ... or, if set, this filesystem's files


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run a front end's event loop on uvloop: libuv's sockets roughly double what one NBD
    connection moves for large requests (bench/RESULTS.md)."""
    uvloop.run(main)


def serve(opts: ServeOptions, ready: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Block until stopped; ``ready`` gets the addresses and files once everything listens."""
    run_loop(_serve(opts, ready))


async def _serve(opts: ServeOptions, ready: Callable[[dict[str, Any]], None] | None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    nbd: NbdServer | None = None
    fuse: Any = None
    try:
        bound = []
        if opts.nbd:
            nbd = NbdServer(lambda: opts.exports, opts.default_export)
            for address in opts.nbd:
                try:
                    bound.append(await nbd.listen(address))
                except (OSError, ValueError) as exc:
                    reason = f"cannot serve NBD at {address}: {getattr(exc, 'strerror', None) or exc}"
                    raise ServeError(name=opts.default_export, reason=reason) from exc
        if opts.fuse_dir is not None:
            from umbra.frontends.fuse_blocks import FuseBlockFiles
            from umbra.frontends.fuse_tree import FuseFileTree  # pyfuse3 only when mounting

            if opts.fuse_tree is not None:
                fuse = FuseFileTree(opts.fuse_tree, opts.fuse_dir, opts.default_export)
            else:
                fuse = FuseBlockFiles(lambda: opts.exports, opts.fuse_dir, opts.default_export)
            await loop.run_in_executor(None, fuse.start)
        if ready is not None:
            ready(
                {
                    "exports": sorted(opts.exports),
                    "nbd": bound,
                    "files": [fuse.image_path(name) for name in sorted(opts.exports)]
                    if fuse is not None and opts.fuse_tree is None
                    else [],
                }
            )
        while not stop.is_set():
            if fuse is not None and not fuse.running:
                break  # unmounted from outside
            try:
                await asyncio.wait_for(stop.wait(), POLL_S)
            except TimeoutError:
                continue
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if nbd is not None:
            await nbd.close()
            nbd.executor.shutdown()
        if fuse is not None:
            await loop.run_in_executor(None, fuse.stop)
