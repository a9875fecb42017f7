"""An asyncio NBD server over :class:`~umbra.frontends.exports.BlockExport` views.

One task per connection reads requests in order.  A small read or write (up to ``INLINE_MAX``,
no FUA) is done right there, at page-cache speed, and its reply queued; the queued replies go out
in one ``writelines`` when the loop is about to wait for the client (and the loop waits while the
client leaves too many unread).  Every other valid request runs in a worker thread (the cow engine
and the kernel do the work, releasing the GIL) and its reply is written under a per-connection
lock, so replies may come back out of order as NBD allows.  Every request is checked
at the edge (:func:`protocol.validate`): a bad one gets an error reply and the connection goes on;
only a broken stream (bad magic, truncated message, oversized payload) closes that connection.
The server itself never stops because of a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from umbra.frontends.exports import BlockExport
from umbra.frontends.nbd import protocol as p
from umbra.frontends.nbd.stream import ExactReader, serve_tcp, serve_unix

log = logging.getLogger("umbra.nbd")
MAX_INFLIGHT = 64
MAX_DESCRIPTORS = 8192
INLINE_MAX = 64 * 1024  # reads and writes up to this size are done in the event loop
REPLY_BATCH = 256 * 1024  # their replies go out together, up to this many bytes at a time


def _inline(req: p.Request) -> bool:
    return req.length <= INLINE_MAX and not req.flags & p.CMD_FLAG_FUA


class _Replies:
    """Replies to requests done in the event loop, written together (one ``writelines``, often one
    system call) when the loop is about to wait, instead of one write each."""

    def __init__(self, w: asyncio.StreamWriter, lock: asyncio.Lock) -> None:
        self.w, self.lock = w, lock
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, *parts: bytes) -> None:
        self.parts.extend(parts)
        self.size += sum(len(part) for part in parts)

    def flush_now(self) -> None:
        if self.parts and not self.w.is_closing():
            self.w.writelines(self.parts)  # whole replies: a task's reply never lands inside one
        self.parts, self.size = [], 0

    async def flush(self) -> None:
        """Write what is queued; wait while the transport holds too much the client has not read."""
        self.flush_now()
        if self.w.transport.get_write_buffer_size() > REPLY_BATCH:
            async with self.lock:
                await self.w.drain()


class _Closed(Exception):
    """The client went away or broke the stream: close this connection."""


@dataclass
class _Session:
    export: BlockExport | None = None
    structured: bool = False
    meta_export: str | None = None  # export the base:allocation context was set for
    no_zeroes: bool = False
    stats: dict[str, int] = field(default_factory=lambda: {"requests": 0, "errors": 0})


class NbdServer:
    def __init__(
        self,
        exports: Callable[[], dict[str, BlockExport]],
        default_export: str,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.exports = exports
        self.default_export = default_export
        self.executor = executor or ThreadPoolExecutor(max_workers=min(16, 4 * (os.cpu_count() or 2)))
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[str] = []
        self._connections: set[asyncio.StreamWriter] = set()
        self.connections_total = 0

    async def listen(self, address: str) -> str:
        """Listen on ``HOST:PORT`` or ``unix:PATH``; returns the address actually bound."""
        if address.startswith("unix:"):
            path = address[5:]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            server = await serve_unix(self._handle, path)
            os.chmod(path, 0o600)
            self._unix_paths.append(path)
            bound = address
        else:
            host, _, port = address.rpartition(":")
            server = await serve_tcp(self._handle, host or "127.0.0.1", int(port))
            sock_host, sock_port = server.sockets[0].getsockname()[:2]
            bound = f"{sock_host}:{sock_port}"
        self._servers.append(server)
        return bound

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for writer in list(self._connections):
            writer.close()
        for server in self._servers:
            await server.wait_closed()
        for path in self._unix_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    # --- connection ------------------------------------------------------------------------

    async def _handle(self, reader: ExactReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        self.connections_total += 1
        session = _Session()
        try:
            # the client went away or broke the stream: just close this connection
            with contextlib.suppress(_Closed, asyncio.IncompleteReadError, ConnectionError):
                if await self._handshake(reader, writer, session):
                    await self._transmission(reader, writer, session)
        except Exception:
            log.exception("NBD connection failed")
        finally:
            self._connections.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _handshake(self, r: ExactReader, w: asyncio.StreamWriter, s: _Session) -> bool:
        w.write(struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT, p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES))
        await w.drain()
        (client_flags,) = struct.unpack(">I", await r.readexactly(4))
        if client_flags & ~(p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES):
            raise _Closed("unknown client flags")
        s.no_zeroes = bool(client_flags & p.FLAG_C_NO_ZEROES)
        while True:
            magic, option, length = p.OPTION_HEADER.unpack(await r.readexactly(p.OPTION_HEADER.size))
            if magic != p.IHAVEOPT:
                raise _Closed("bad option magic")
            if length > p.MAX_OPTION_DATA:
                raise _Closed("option data too long")
            data = await r.readexactly(length)
            if option == p.OPT_EXPORT_NAME:
                export = self.exports().get(data.decode(errors="replace") or self.default_export)
                if export is None:
                    raise _Closed("unknown export")
                s.export = export
                w.write(struct.pack(">QH", export.size, self._flags(export)))
                if not s.no_zeroes:
                    w.write(bytes(124))
                await w.drain()
                return True
            if option == p.OPT_ABORT:
                self._reply(w, option, p.REP_ACK)
                await w.drain()
                return False
            if option in (p.OPT_INFO, p.OPT_GO):
                if self._info(w, option, data, s) and option == p.OPT_GO:
                    await w.drain()
                    return True
            elif option == p.OPT_LIST:
                if length:
                    self._reply(w, option, p.REP_ERR_INVALID, b"LIST takes no data")
                else:
                    for name in self.exports():
                        self._reply(w, option, p.REP_SERVER, struct.pack(">I", len(name.encode())) + name.encode())
                    self._reply(w, option, p.REP_ACK)
            elif option == p.OPT_STRUCTURED_REPLY:
                if length:
                    self._reply(w, option, p.REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data")
                else:
                    s.structured = True
                    self._reply(w, option, p.REP_ACK)
            elif option in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
                self._meta_context(w, option, data, s)
            else:
                self._reply(w, option, p.REP_ERR_UNSUP, b"option not supported")
            await w.drain()

    def _reply(self, w: asyncio.StreamWriter, option: int, kind: int, data: bytes = b"") -> None:
        w.write(p.OPTION_REPLY.pack(p.OPT_REPLY_MAGIC, option, kind, len(data)) + data)

    def _flags(self, export: BlockExport) -> int:
        flags = p.TF_HAS_FLAGS | p.TF_SEND_FLUSH | p.TF_SEND_FUA | p.TF_CAN_MULTI_CONN | p.TF_SEND_DF
        if export.read_only:
            return flags | p.TF_READ_ONLY
        return flags | p.TF_SEND_TRIM | p.TF_SEND_WRITE_ZEROES

    def _info(self, w: asyncio.StreamWriter, option: int, data: bytes, s: _Session) -> bool:
        try:
            (nlen,) = struct.unpack_from(">I", data)
            name = data[4 : 4 + nlen].decode()
            (ninfo,) = struct.unpack_from(">H", data, 4 + nlen)
            requests = struct.unpack_from(f">{ninfo}H", data, 6 + nlen)
            if len(data) != 6 + nlen + 2 * ninfo:
                raise ValueError("length mismatch")
        except (struct.error, UnicodeDecodeError, ValueError):
            self._reply(w, option, p.REP_ERR_INVALID, b"malformed INFO/GO request")
            return False
        export = self.exports().get(name or self.default_export)
        if export is None:
            self._reply(w, option, p.REP_ERR_UNKNOWN, f"no export named {name!r}".encode())
            return False
        self._reply(w, option, p.REP_INFO, struct.pack(">HQH", p.INFO_EXPORT, export.size, self._flags(export)))
        if p.INFO_NAME in requests:
            self._reply(w, option, p.REP_INFO, struct.pack(">H", p.INFO_NAME) + export.name.encode())
        if p.INFO_DESCRIPTION in requests:
            self._reply(w, option, p.REP_INFO, struct.pack(">H", p.INFO_DESCRIPTION) + export.description.encode())
        self._reply(
            w,
            option,
            p.REP_INFO,
            struct.pack(">HIII", p.INFO_BLOCK_SIZE, p.MIN_BLOCK, p.PREFERRED_BLOCK, p.MAX_PAYLOAD),
        )
        self._reply(w, option, p.REP_ACK)
        if option == p.OPT_GO:
            s.export = export
            if s.meta_export is not None and s.meta_export != export.name:
                s.meta_export = None  # contexts were set for another export
        return True

    def _meta_context(self, w: asyncio.StreamWriter, option: int, data: bytes, s: _Session) -> None:
        try:
            (nlen,) = struct.unpack_from(">I", data)
            name = data[4 : 4 + nlen].decode()
            (nq,) = struct.unpack_from(">I", data, 4 + nlen)
            pos, queries = 8 + nlen, []
            for _ in range(nq):
                (qlen,) = struct.unpack_from(">I", data, pos)
                queries.append(data[pos + 4 : pos + 4 + qlen].decode())
                pos += 4 + qlen
            if pos != len(data):
                raise ValueError("length mismatch")
        except (struct.error, UnicodeDecodeError, ValueError):
            self._reply(w, option, p.REP_ERR_INVALID, b"malformed meta context request")
            return
        if option == p.OPT_SET_META_CONTEXT and not s.structured:
            self._reply(w, option, p.REP_ERR_INVALID, b"negotiate structured replies first")
            return
        export = self.exports().get(name or self.default_export)
        if export is None:
            self._reply(w, option, p.REP_ERR_UNKNOWN, f"no export named {name!r}".encode())
            return
        if option == p.OPT_LIST_META_CONTEXT:
            wanted = not queries or any(q in ("base:", p.BASE_ALLOCATION) for q in queries)
        else:
            wanted = p.BASE_ALLOCATION in queries
            s.meta_export = export.name if wanted else None
        if wanted:
            payload = struct.pack(">I", p.BASE_ALLOCATION_ID) + p.BASE_ALLOCATION.encode()
            self._reply(w, option, p.REP_META_CONTEXT, payload)
        self._reply(w, option, p.REP_ACK)

    # --- transmission ----------------------------------------------------------------------

    async def _transmission(self, r: ExactReader, w: asyncio.StreamWriter, s: _Session) -> None:
        assert s.export is not None
        export = s.export
        lock = asyncio.Lock()
        slots = asyncio.Semaphore(MAX_INFLIGHT)
        tasks: set[asyncio.Task[None]] = set()
        replies = _Replies(w, lock)
        try:
            while True:
                if r.buffered() < p.REQUEST.size:
                    await replies.flush()  # about to wait for the client: what is done goes out
                try:
                    raw = await r.readexactly(p.REQUEST.size)
                except asyncio.IncompleteReadError:
                    return
                req = p.Request.parse(raw)
                if req.magic != p.REQUEST_MAGIC:
                    log.warning("NBD request with bad magic %#x: closing the connection", req.magic)
                    return
                s.stats["requests"] += 1
                payload = b""
                if req.type == p.CMD_WRITE:
                    if req.length > p.MAX_DISCARDABLE:
                        await replies.flush()
                        await self._error(w, lock, s, req, p.EINVAL, "write payload too large")
                        return
                    if r.buffered() < req.length:
                        await replies.flush()
                    payload = await r.readexactly(req.length)
                meta_ok = s.meta_export == export.name
                err = p.validate(req, export.size, export.read_only, s.structured)
                if err is None and req.type == p.CMD_BLOCK_STATUS and not meta_ok:
                    err = p.EINVAL
                if err is not None:
                    s.stats["errors"] += 1
                    name = p.COMMAND_NAMES.get(req.type, str(req.type))
                    await replies.flush()
                    await self._error(w, lock, s, req, err, f"invalid {name} request")
                    continue
                if req.type == p.CMD_DISC:
                    return
                if req.type in (p.CMD_READ, p.CMD_WRITE) and export.inline and _inline(req):
                    # small I/O costs less than a task and a hop to a worker thread: done here (page
                    # cache speed), its reply sent with the others done before the loop next waits
                    try:
                        if req.type == p.CMD_READ:
                            replies.add(*self._read_reply(s, req, export.read(req.offset, req.length)))
                        else:
                            export.write(req.offset, payload, False)
                            replies.add(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, req.cookie))
                    except Exception as exc:  # noqa: BLE001 - becomes the request's error reply
                        await replies.flush()
                        await self._failed(w, lock, s, req, exc)
                    finally:
                        if payload:
                            r.release(payload)
                    if replies.size >= REPLY_BATCH:
                        await replies.flush()  # and wait while the client does not read them
                    continue
                if slots.locked():
                    await replies.flush()
                await slots.acquire()
                task = asyncio.create_task(self._run(w, lock, s, export, req, payload))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                if payload:  # exports copy what they write: the buffer is free once the request is done
                    task.add_done_callback(lambda _t, b=payload: r.release(b))  # type: ignore[misc]
                task.add_done_callback(lambda _t: slots.release())
        finally:
            replies.flush_now()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(
        self,
        w: asyncio.StreamWriter,
        lock: asyncio.Lock,
        s: _Session,
        export: BlockExport,
        req: p.Request,
        payload: bytes,
    ) -> None:
        loop = asyncio.get_running_loop()
        fua = bool(req.flags & p.CMD_FLAG_FUA)
        try:
            if req.type == p.CMD_READ:
                data = await loop.run_in_executor(self.executor, export.read, req.offset, req.length)
                await self._send(w, lock, *self._read_reply(s, req, data))
                return
            if req.type == p.CMD_BLOCK_STATUS:
                descriptors = await loop.run_in_executor(self.executor, self._status, export, req)
                body = struct.pack(">I", p.BASE_ALLOCATION_ID) + b"".join(struct.pack(">II", *d) for d in descriptors)
                await self._send(
                    w,
                    lock,
                    p.STRUCTURED_REPLY.pack(
                        p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_TYPE_BLOCK_STATUS, req.cookie, len(body)
                    )
                    + body,
                )
                return
            if req.type == p.CMD_WRITE:
                await loop.run_in_executor(self.executor, export.write, req.offset, payload, fua)
            elif req.type in (p.CMD_TRIM, p.CMD_WRITE_ZEROES):
                await loop.run_in_executor(self.executor, export.zero, req.offset, req.length, fua)
            elif req.type == p.CMD_FLUSH:
                await loop.run_in_executor(self.executor, export.flush)
            # CMD_CACHE: the data is local, nothing to prefetch
            await self._send(w, lock, p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, req.cookie))
        except (ConnectionError, _Closed):
            raise
        except Exception as exc:  # noqa: BLE001 - becomes the request's error reply
            await self._failed(w, lock, s, req, exc)

    async def _failed(
        self, w: asyncio.StreamWriter, lock: asyncio.Lock, s: _Session, req: p.Request, exc: Exception
    ) -> None:
        s.stats["errors"] += 1
        log.warning("NBD %s at %d+%d failed: %s", p.COMMAND_NAMES.get(req.type), req.offset, req.length, exc)
        await self._error(w, lock, s, req, p.wire_error(exc), str(exc)[:200])

    def _status(self, export: BlockExport, req: p.Request) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for start, end, has_data in export.allocation(req.offset, req.length):
            flags = 0 if has_data else p.STATE_HOLE | p.STATE_ZERO
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + end - start, flags)
            else:
                out.append((end - start, flags))
            if req.flags & p.CMD_FLAG_REQ_ONE or len(out) >= MAX_DESCRIPTORS:
                break
        return out[:1] if req.flags & p.CMD_FLAG_REQ_ONE else out

    @staticmethod
    def _read_reply(s: _Session, req: p.Request, data: bytes) -> tuple[bytes, bytes]:
        if s.structured:
            head = p.STRUCTURED_REPLY.pack(
                p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_TYPE_OFFSET_DATA, req.cookie, 8 + len(data)
            ) + struct.pack(">Q", req.offset)
        else:
            head = p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, req.cookie)
        return head, data

    async def _error(
        self, w: asyncio.StreamWriter, lock: asyncio.Lock, s: _Session, req: p.Request, err: int, message: str
    ) -> None:
        if s.structured and req.type in (p.CMD_READ, p.CMD_BLOCK_STATUS):
            msg = message.encode()[:4096]
            body = struct.pack(">IH", err, len(msg)) + msg
            await self._send(
                w,
                lock,
                p.STRUCTURED_REPLY.pack(
                    p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_TYPE_ERROR, req.cookie, len(body)
                )
                + body,
            )
        else:
            await self._send(w, lock, p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, err, req.cookie))

    async def _send(self, w: asyncio.StreamWriter, lock: asyncio.Lock, *parts: bytes) -> None:
        async with lock:
            w.writelines(parts)
            await w.drain()
