"""The NBD connection reader: exact reads across any split of the byte stream, large payloads
received in place, the end of the stream mid-read, on asyncio's loop and on uvloop."""

from __future__ import annotations

import asyncio
import os
import random
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import uvloop

from umbra.frontends.nbd.stream import DIRECT_MIN, ExactReader, serve_unix

RUNNERS: dict[str, Callable[..., object]] = {"asyncio": asyncio.run, "uvloop": uvloop.run}
TAIL = b"x" * DIRECT_MIN  # sent after the stream: half of the last read, then the end


def send_in_pieces(path: str, stream: bytes) -> bytes:
    """Send ``stream`` in uneven pieces crossing every read boundary, then TAIL; close; the reply."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    pos, cut = 0, random.Random(2)
    while pos < len(stream):
        n = cut.choice([1, 7, 1000, 65536, 300000])
        s.sendall(stream[pos : pos + n])
        pos += n
    s.sendall(TAIL)
    s.shutdown(socket.SHUT_WR)
    reply = s.recv(10)
    s.close()
    return reply


async def read_all(reader: ExactReader, sizes: list[int]) -> tuple[list[bytes], bytes]:
    got = [bytes(await reader.readexactly(n)) for n in sizes]
    try:
        await reader.readexactly(DIRECT_MIN * 2)
    except asyncio.IncompleteReadError as exc:
        return got, exc.partial
    return got, b"not the end"


async def exchange(path: str, sizes: list[int], stream: bytes) -> tuple[list[bytes], bytes, bytes]:
    results: dict[str, object] = {}

    async def handler(reader: ExactReader, writer: asyncio.StreamWriter) -> None:
        results["read"] = await read_all(reader, sizes)
        writer.write(b"done")
        await writer.drain()
        writer.close()

    server = await serve_unix(handler, path)
    reply = await asyncio.get_running_loop().run_in_executor(None, send_in_pieces, path, stream)
    server.close()
    got, partial = results["read"]  # type: ignore[misc]
    return got, partial, reply


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_reads_match_the_stream_however_it_is_split(tmp_path: Path, runner: str) -> None:
    rng = random.Random(1)
    sizes = [rng.choice([4, 28, 100, 4096, DIRECT_MIN - 1, DIRECT_MIN, 1 << 20, 3 << 20]) for _ in range(60)]
    stream = os.urandom(sum(sizes))
    got, partial, reply = RUNNERS[runner](exchange(str(tmp_path / "s.sock"), sizes, stream))  # type: ignore[misc]
    assert reply == b"done"
    assert [len(g) for g in got] == sizes and b"".join(got) == stream
    assert partial == TAIL, "the end of the stream mid-read hands back what came"


def test_the_payload_pool_is_bounded_in_bytes() -> None:
    """Released payload buffers are kept for reuse, but never more than POOL_MAX_BYTES of them
    however many payload sizes a client uses."""
    import mmap

    from umbra.frontends.nbd import stream

    async def main() -> None:
        reader = ExactReader(lambda r, w: asyncio.sleep(0), asyncio.get_running_loop())
        sizes = [DIRECT_MIN + 4096 * k for k in range(400)]
        for n in sizes:
            reader.release(mmap.mmap(-1, n))  # type: ignore[arg-type]
        kept = sum(len(b) for free in reader._pool.values() for b in free)
        assert 0 < kept <= stream.POOL_MAX_BYTES and kept == reader._pool_bytes

    asyncio.run(main())
