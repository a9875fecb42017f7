"""A block source read over NBD: ``nbd+unix:///EXPORT?socket=PATH`` or ``nbd://HOST[:PORT]/EXPORT``.

Backups of protected volumes read their snapshots this way, and any NBD server (qemu-nbd, nbdkit,
qemu-storage-daemon) can be backed up the same way.  A minimal client: fixed newstyle, NBD_OPT_GO,
simple replies, READ requests of at most 32 MiB, several in flight at once (``read_many``): a
tracked incremental reads many small scattered blocks, and one round trip each would dominate it.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections import deque
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlparse

from umbra.errors import SourceError, SourceReadError
from umbra.frontends.nbd import protocol as p
from umbra.volume.extents import Extent

MAX_IN_FLIGHT = 16  # READ requests sent before their replies are read
MAX_IN_FLIGHT_BYTES = 16 << 20  # and the bytes they ask for


class _Range:
    """One range of ``read_many``: its buffer, and how many of its requests are unanswered."""

    def __init__(self, start: int, length: int) -> None:
        self.start = start
        self.buf = bytearray(length)
        self.left = 0

    def requests(self) -> list[tuple[_Range, memoryview, int]]:
        view = memoryview(self.buf)
        parts = [(self, view[k : k + p.MAX_PAYLOAD], self.start + k) for k in range(0, len(self.buf), p.MAX_PAYLOAD)]
        self.left = len(parts)
        return parts


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
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _recv_into(self, view: memoryview) -> None:
        while view:
            got = self.sock.recv_into(view)
            if not got:
                raise ConnectionError("the NBD server closed the connection")
            view = view[got:]

    def read_at(self, offset: int, length: int) -> bytes:
        reads = self.read_many([(offset, length)])
        try:
            return next(reads)
        finally:
            reads.close()  # releases the connection's lock now, not when the generator is collected

    def read_many(self, ranges: Iterable[tuple[int, int]]) -> Generator[bytes, None, None]:
        """The data of each ``(offset, length)`` range, in order, with up to MAX_IN_FLIGHT requests
        (MAX_IN_FLIGHT_BYTES) sent ahead; replies may come in any order (matched by cookie)."""
        with self._lock:
            yield from self._pipeline(iter(ranges))

    def _pipeline(self, ranges: Iterator[tuple[int, int]]) -> Iterator[bytes]:
        wanted: deque[_Range] = deque()  # ranges taken, in order
        unsent: deque[tuple[_Range, memoryview, int]] = deque()  # their requests not sent yet
        pending: dict[int, tuple[_Range, memoryview, int]] = {}  # cookie -> where its data goes
        in_flight = 0  # bytes asked for and not received
        exhausted = False
        offset = 0
        try:
            while True:
                while not exhausted and len(unsent) < MAX_IN_FLIGHT:
                    nxt = next(ranges, None)
                    if nxt is None:
                        exhausted = True
                        break
                    rng = _Range(nxt[0], max(0, min(nxt[1], self.size - nxt[0])))
                    wanted.append(rng)
                    unsent.extend(rng.requests())
                while (
                    unsent
                    and len(pending) < MAX_IN_FLIGHT
                    and (not pending or in_flight + len(unsent[0][1]) <= MAX_IN_FLIGHT_BYTES)
                ):
                    rng, view, offset = request = unsent.popleft()
                    self._cookie += 1
                    pending[self._cookie] = request
                    in_flight += len(view)
                    self.sock.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_READ, self._cookie, offset, len(view)))
                while wanted and wanted[0].left == 0:
                    yield bytes(wanted.popleft().buf)
                if not pending:
                    if exhausted and not unsent and not wanted:
                        return
                    continue
                offset = self._receive(pending)
                in_flight = sum(len(view) for _, view, _ in pending.values())
        except (OSError, ConnectionError, struct.error) as exc:
            raise SourceReadError(path=self.path, offset=offset, reason=str(exc)) from exc
        finally:
            with contextlib.suppress(OSError, ConnectionError, struct.error, SourceReadError):
                while pending:  # the caller stopped early: keep the connection in step
                    self._receive(pending)

    def _receive(self, pending: dict[int, tuple[_Range, memoryview, int]]) -> int:
        """Read one reply into its request's place; returns the request's offset."""
        magic, err, cookie = p.SIMPLE_REPLY.unpack(self._recv(p.SIMPLE_REPLY.size))
        if magic != p.SIMPLE_REPLY_MAGIC or cookie not in pending:
            raise ConnectionError("unexpected NBD reply")
        rng, view, offset = pending.pop(cookie)
        if err:
            raise SourceReadError(path=self.path, offset=offset, reason=f"NBD error {err}")
        self._recv_into(view)
        rng.left -= 1
        return offset

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
