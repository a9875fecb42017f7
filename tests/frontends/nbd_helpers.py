"""A served protected volume for tests, and a tiny raw NBD client for protocol-level checks."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from pathlib import Path

from umbra.cow.engine import CowVolume
from umbra.frontends.exports import exports_of
from umbra.frontends.nbd import protocol as p
from umbra.frontends.nbd.server import NbdServer


class ServedVolume:
    """An NbdServer for ``volume`` on a unix socket, its event loop in a thread."""

    def __init__(self, volume: CowVolume, sock: Path) -> None:
        self.volume = volume
        self.sock = sock
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = NbdServer(lambda: exports_of(volume), volume.name)
        asyncio.run_coroutine_threadsafe(self.server.listen(f"unix:{sock}"), self.loop).result()

    def uri(self, export: str | None = None) -> str:
        return f"nbd+unix:///{export or self.volume.name}?socket={self.sock}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.server.executor.shutdown()


class RawClient:
    """Speaks just enough NBD to send requests a real client never would."""

    def __init__(self, sock: Path, export: str, structured: bool = False) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(10)
        self.s.connect(str(sock))
        magic, opt, flags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (p.NBDMAGIC, p.IHAVEOPT) and flags & p.FLAG_FIXED_NEWSTYLE
        self.s.sendall(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES))
        if structured:
            assert self.option(p.OPT_STRUCTURED_REPLY)[0][0] == p.REP_ACK
        name = export.encode()
        replies = self.option(p.OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        assert replies[-1][0] == p.REP_ACK, replies
        self.size, self.flags = struct.unpack(">QH", replies[0][1][2:12])

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        self.s.sendall(p.OPTION_HEADER.pack(p.IHAVEOPT, option, len(data)) + data)
        replies = []
        while True:
            magic, opt, kind, length = p.OPTION_REPLY.unpack(self.recv(p.OPTION_REPLY.size))
            assert magic == p.OPT_REPLY_MAGIC and opt == option
            replies.append((kind, self.recv(length)))
            if kind == p.REP_ACK or kind & (1 << 31):
                return replies

    def request(
        self,
        cmd: int,
        offset: int,
        length: int,
        flags: int = 0,
        payload: bytes = b"",
        magic: int = p.REQUEST_MAGIC,
        cookie: int = 7,
    ) -> None:
        self.s.sendall(p.REQUEST.pack(magic, flags, cmd, cookie, offset, length) + payload)

    def simple_reply(self, data_len: int = 0) -> tuple[int, bytes]:
        magic, err, cookie = p.SIMPLE_REPLY.unpack(self.recv(p.SIMPLE_REPLY.size))
        assert magic == p.SIMPLE_REPLY_MAGIC and cookie == 7
        return err, self.recv(data_len) if not err else b""

    def structured_reply(self) -> tuple[int, bytes]:
        magic, flags, kind, cookie, length = p.STRUCTURED_REPLY.unpack(self.recv(p.STRUCTURED_REPLY.size))
        assert magic == p.STRUCTURED_REPLY_MAGIC and flags & p.REPLY_FLAG_DONE and cookie == 7
        return kind, self.recv(length)

    def close(self) -> None:
        self.s.close()
