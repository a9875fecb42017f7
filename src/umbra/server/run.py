"""Run the backup server until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import signal
import ssl
from collections.abc import Callable
from pathlib import Path

import uvloop
from aiohttp import web

from umbra.errors import ServeError
from umbra.server.app import Server
from umbra.server.tokens import TokenStore, tokens_path


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ServeError(name="serve", reason=f"--listen {listen!r}: give HOST:PORT")
    return host.strip("[]"), int(port)


def serve(
    root: Path,
    listen: str,
    tls: tuple[str, str] | None = None,
    ready: Callable[[str], None] | None = None,
    quota: int | None = None,
) -> None:
    """Serve the repositories under ``root``; ``ready`` gets the URL once it listens."""
    host, port = parse_listen(listen)
    context = None
    if tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(*tls)
        except (OSError, ssl.SSLError) as exc:
            raise ServeError(name="serve", reason=f"cannot load the TLS certificate and key: {exc}") from None
    (root / "repos").mkdir(parents=True, exist_ok=True)
    uvloop.run(_serve(Server(root, TokenStore(tokens_path(root)), quota=quota), host, port, context, ready))


async def _serve(
    server: Server, host: str, port: int, context: ssl.SSLContext | None, ready: Callable[[str], None] | None
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=context)
        try:
            await site.start()
        except OSError as exc:
            raise ServeError(name="serve", reason=f"cannot listen on {host}:{port}: {exc.strerror}") from None
        bound_host, bound_port = runner.addresses[0][:2]
        scheme = "https" if context is not None else "http"
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        if ready is not None:
            ready(f"{scheme}://{shown}:{bound_port}")
        await stop.wait()
    finally:
        await runner.cleanup()
        server.executor.shutdown()
