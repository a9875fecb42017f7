"""A stream reader for NBD connections that receives large payloads straight into their buffer.

asyncio's ``StreamReader`` copies every byte twice under the GIL (``feed_data`` appends to its
buffer, ``readexactly`` copies out): with 1 MiB writes that was 43 % of the event loop's time.
This reader is a ``BufferedProtocol``: the transport reads into a small buffer for headers, and
when ``readexactly`` waits for a large payload, directly into that payload's own buffer (one copy,
by the kernel).  The writer side stays asyncio's ``StreamWriter``; this protocol gives it the write
flow control it needs (``_drain_helper``).  It must not derive from ``asyncio.Protocol`` (as
asyncio's ``FlowControlMixin`` does): uvloop would then call ``data_received`` instead.
"""

from __future__ import annotations

import asyncio
import mmap
from collections.abc import Callable, Coroutine
from typing import Any, cast

HEAD_BUFFER = 256 << 10  # headers and small payloads; larger ones are received into their own buffer
DIRECT_MIN = 64 << 10  # a wait for this many bytes or more receives them straight into the result
PAUSE_ABOVE = 4 << 20  # unread bytes past which the transport stops reading (the client must wait)
POOL_PER_SIZE = 16  # payload buffers kept for reuse, per payload size
POOL_MAX_BYTES = 64 << 20  # and in all, per connection (a client may use many payload sizes)

Handler = Callable[["ExactReader", asyncio.StreamWriter], Coroutine[Any, Any, None]]


class ExactReader(asyncio.BufferedProtocol):
    """Protocol and reader in one: ``readexactly`` as on a ``StreamReader``."""

    def __init__(self, handler: Handler, loop: asyncio.AbstractEventLoop) -> None:
        self._handler = handler
        self._write_paused = False
        self._lost = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._loop = loop
        self._buf = bytearray(HEAD_BUFFER)
        self._start = self._end = 0  # unread bytes: _buf[_start:_end]
        self._target: mmap.mmap | None = None  # a payload being received in place
        self._filled = 0
        self._want = 0  # bytes the waiting readexactly needs (in _buf or in _target)
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._reading_paused = False
        self._closed: asyncio.Future[None] = loop.create_future()
        self._transport: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None  # the handler (held here: the loop keeps tasks weakly)
        # payload buffers handed back with release(): a fresh 1 MiB buffer costs page faults
        # (and zeroing) that were a third of the event loop's time under large writes.  They are
        # anonymous mappings: page-aligned, so the CDP journal writes them with O_DIRECT as they are
        self._pool: dict[int, list[mmap.mmap]] = {}
        self._pool_bytes = 0

    # --- protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's do not subclass asyncio.Transport
        writer = asyncio.StreamWriter(self._transport, self, None, self._loop)
        self._task = self._loop.create_task(self._handler(self, writer))

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._target is not None:
            return memoryview(self._target)[self._filled :]
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buf) - self._end < 4096:  # make room: unread bytes to the front, or grow
            unread = self._buf[self._start : self._end]
            if len(unread) + 4096 > len(self._buf):
                self._buf = bytearray(max(len(self._buf) * 2, len(unread) + HEAD_BUFFER))
            self._buf[: len(unread)] = unread
            self._start, self._end = 0, len(unread)
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._target is not None:
            self._filled += nbytes
            if self._filled >= self._want:
                self._target = None  # full: what arrives next goes to the head buffer
                self._wake()
            return
        self._end += nbytes
        if self._end - self._start >= self._want:
            self._wake()
        if self._end - self._start > PAUSE_ABOVE and not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return True  # half-closed, as with asyncio's streams: replies can still go out; the handler closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._wake_drainers(exc or ConnectionResetError("connection lost"))
        self._eof = True  # a waiting readexactly ends with IncompleteReadError
        self._wake()
        if not self._closed.done():
            self._closed.set_result(None)

    # --- write flow control, for StreamWriter.drain and wait_closed ---------------------------

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drainers(None)

    async def _drain_helper(self) -> None:
        if self._lost:
            raise ConnectionResetError("connection lost")
        if not self._write_paused:
            return
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter

    def _wake_drainers(self, exc: BaseException | None) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if waiter.done():
                continue
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)

    def _get_close_waiter(self, stream: asyncio.StreamWriter) -> asyncio.Future[None]:
        return self._closed

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # --- reader ----------------------------------------------------------------------------

    def buffered(self) -> int:
        """Bytes received and not read yet: ``readexactly`` of as many returns without waiting."""
        return self._end - self._start

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or ``asyncio.IncompleteReadError`` at the end of the stream.  A
        large payload comes back as a page-aligned ``mmap`` buffer that nothing else uses (no copy to ``bytes``);
        hand it back with :meth:`release` once done with it."""
        avail = self._end - self._start
        if avail >= n:
            data = self._take(n)
            self._consumed(n)
            return data
        if n >= DIRECT_MIN:
            free = self._pool.get(n)
            if free:
                out = free.pop()
                self._pool_bytes -= n
            else:
                out = mmap.mmap(-1, n)
            with memoryview(self._buf) as view:  # no intermediate copy; released before the buffer can grow
                out[:avail] = view[self._start : self._end]
            self._consumed(avail)
            self._target, self._filled, self._want = out, avail, n
            try:
                await self._wait(lambda: self._filled >= n)
            finally:
                self._target = None
            if self._filled < n:
                raise asyncio.IncompleteReadError(bytes(out[: self._filled]), n)
            return out  # type: ignore[return-value]
        self._want = n
        await self._wait(lambda: self._end - self._start >= n)
        if self._end - self._start < n:
            partial = bytes(self._buf[self._start : self._end])
            self._consumed(len(partial))
            raise asyncio.IncompleteReadError(partial, n)
        data = self._take(n)
        self._consumed(n)
        return data

    def _take(self, n: int) -> bytes:
        """The next ``n`` unread bytes, copied once."""
        with memoryview(self._buf) as view:
            return bytes(view[self._start : self._start + n])

    def release(self, payload: bytes) -> None:
        """``payload`` (from ``readexactly``) is no longer used by anyone: reuse its buffer."""
        if isinstance(payload, mmap.mmap) and len(payload) >= DIRECT_MIN:
            free = self._pool.setdefault(len(payload), [])
            if len(free) < POOL_PER_SIZE and self._pool_bytes + len(payload) <= POOL_MAX_BYTES:
                free.append(payload)
                self._pool_bytes += len(payload)

    async def _wait(self, ready: Callable[[], bool]) -> None:
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()
        while not ready() and not self._eof:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self._want = 0

    def _consumed(self, n: int) -> None:
        self._start += n
        if self._reading_paused and self._end - self._start <= PAUSE_ABOVE // 2 and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()


async def serve_unix(handler: Handler, path: str) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_unix_server(lambda: ExactReader(handler, loop), path)


async def serve_tcp(handler: Handler, host: str, port: int, **kw: Any) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: ExactReader(handler, loop), host, port, **kw)
