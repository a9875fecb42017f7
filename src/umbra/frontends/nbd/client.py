"""A block source read over NBD: ``nbd+unix:///EXPORT?socket=PATH`` or ``nbd://HOST[:PORT]/EXPORT``.

Backups of protected volumes read their snapshots this way, and any NBD server (qemu-nbd, nbdkit,
qemu-storage-daemon) can be backed up the same way.  A minimal client: fixed newstyle, NBD_OPT_GO,
simple replies, sequential READ requests of at most 32 MiB.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlparse

from umbra.errors import SourceError, SourceReadError
from umbra.frontends.nbd import protocol as p
from umbra.volume.extents import Extent


def is_nbd_uri(path: str) -> bool:
    return path.startswith(("nbd://", "nbd+unix://"))


@dataclass
class NbdSource:
    path: str
    sock: socket.socket
    size: int
    is_block_device: bool = False

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._cookie = 0

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 4 << 20))
            if not chunk:
                raise ConnectionError("the NBD server closed the connection")
            buf += chunk
        return bytes(buf)

    def read_at(self, offset: int, length: int) -> bytes:
        length = min(length, self.size - offset)
        out = bytearray()
        try:
            with self._lock:
                while len(out) < length:
                    n = min(p.MAX_PAYLOAD, length - len(out))
                    self._cookie += 1
                    request = (p.REQUEST_MAGIC, 0, p.CMD_READ, self._cookie, offset + len(out), n)
                    self.sock.sendall(p.REQUEST.pack(*request))
                    magic, err, cookie = p.SIMPLE_REPLY.unpack(self._recv(p.SIMPLE_REPLY.size))
                    if magic != p.SIMPLE_REPLY_MAGIC or cookie != self._cookie:
                        raise ConnectionError("unexpected NBD reply")
                    if err:
                        raise SourceReadError(path=self.path, offset=offset + len(out), reason=f"NBD error {err}")
                    out += self._recv(n)
        except (OSError, ConnectionError) as exc:
            raise SourceReadError(path=self.path, offset=offset + len(out), reason=str(exc)) from exc
        return bytes(out)

    def data_extents(self) -> list[Extent] | None:
        return None

    def close(self) -> None:
        with contextlib.suppress(OSError):  # the server went first: nothing to tell it
            self.sock.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_DISC, 0, 0, 0))
        self.sock.close()


def open_nbd(uri: str) -> NbdSource:
    """Connect and negotiate the export named in ``uri``.

    Raises:
        SourceError: bad URI, nothing listening, unknown export.
    """
    u = urlparse(uri)
    export = unquote(u.path.lstrip("/"))
    try:
        if u.scheme == "nbd+unix":
            path = parse_qs(u.query).get("socket", [""])[0]
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
        else:
            sock = socket.create_connection((u.hostname or "localhost", u.port or 10809))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        raise SourceError(path=uri, reason=f"cannot connect: {exc.strerror or exc}") from exc
    source = NbdSource(uri, sock, 0)
    try:
        magic, opt, _flags = struct.unpack(">QQH", source._recv(18))
        if magic != p.NBDMAGIC or opt != p.IHAVEOPT:
            raise SourceError(path=uri, reason="not a fixed-newstyle NBD server")
        sock.sendall(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES))
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        sock.sendall(p.OPTION_HEADER.pack(p.IHAVEOPT, p.OPT_GO, len(data)) + data)
        while True:
            magic, _opt, kind, length = p.OPTION_REPLY.unpack(source._recv(p.OPTION_REPLY.size))
            payload = source._recv(length)
            if magic != p.OPT_REPLY_MAGIC:
                raise SourceError(path=uri, reason="bad NBD option reply")
            if kind == p.REP_INFO and len(payload) >= 12 and struct.unpack_from(">H", payload)[0] == p.INFO_EXPORT:
                source.size = struct.unpack_from(">Q", payload, 2)[0]
            elif kind == p.REP_ACK:
                return source
            elif kind & (1 << 31):
                raise SourceError(path=uri, reason=f"export {export!r}: {payload.decode(errors='replace') or kind}")
    except (OSError, ConnectionError, struct.error) as exc:
        sock.close()
        raise SourceError(path=uri, reason=f"NBD handshake failed: {exc}") from exc
    except BaseException:
        sock.close()
        raise
