"""The NBD server against the real clients (qemu-img, qemu-io, nbdinfo, nbdcopy) and raw bad requests."""

from __future__ import annotations

import asyncio
import json
import os
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import requires
from tests.cow.helpers import make_volume
from umbra.frontends.nbd import protocol as p
from umbra.frontends.nbd.server import NbdServer

from .nbd_helpers import RawClient, ServedVolume

MiB = 1 << 20
SIZE = 16 * MiB


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServedVolume]:
    vol = make_volume(tmp_path, SIZE, chunk=64 * 1024)
    server = ServedVolume(vol, tmp_path / "nbd.sock")
    yield server
    server.stop()
    vol.close()
    vol.backing.close()


def run(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"{cmd[0]} failed: {proc.stderr}"
    return proc.stdout


def test_qemu_io_writes_and_reads(served: ServedVolume) -> None:
    requires("qemu-io")
    run(
        "qemu-io",
        "-f",
        "raw",
        served.uri(),
        "-c",
        "write -P 0xab 1M 256k",
        "-c",
        "write -z 4M 64k",
        "-c",
        "discard 2M 64k",
        "-c",
        "flush",
        "-c",
        "write -f -P 0x11 8M 4k",
    )
    assert served.volume.read(1 * MiB, 256 * 1024) == b"\xab" * 256 * 1024
    assert served.volume.read(8 * MiB, 4096) == b"\x11" * 4096
    out = run("qemu-io", "-f", "raw", served.uri(), "-c", "read -P 0xab 1M 256k", "-c", "read -P 0 2M 64k")
    assert "read 262144/262144" in out and "read 65536/65536" in out


def test_qemu_img_info_convert_and_map(served: ServedVolume, tmp_path: Path) -> None:
    requires("qemu-img")
    data = os.urandom(3 * MiB)
    served.volume.write(5 * MiB, data)
    info = json.loads(run("qemu-img", "info", "--output=json", served.uri()))
    assert info["virtual-size"] == SIZE
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", served.uri(), str(tmp_path / "copy.img"))
    assert (tmp_path / "copy.img").read_bytes() == served.volume.read(0, SIZE)
    extents = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", served.uri()))
    with_data = [(e["start"], e["length"]) for e in extents if e["data"]]
    assert with_data == [(5 * MiB, 3 * MiB)]  # holes come from base:allocation


def test_nbdinfo_lists_exports_block_sizes_and_snapshot_map(served: ServedVolume) -> None:
    requires("nbdinfo")
    served.volume.write(0, b"x" * 128 * 1024)
    served.volume.create_snapshot("s1", used=[(0, 64 * 1024)])
    listing = json.loads(run("nbdinfo", "--json", "--list", f"nbd+unix://?socket={served.sock}"))
    names = {e["export-name"]: e for e in listing["exports"]}
    assert set(names) == {"v", "v@s1"}
    assert names["v@s1"]["is_read_only"] and not names["v"]["is_read_only"]
    info = json.loads(run("nbdinfo", "--json", served.uri("v@s1")))["exports"][0]
    assert (info["block_size_minimum"], info["block_size_preferred"], info["block_size_maximum"]) == (1, 4096, 32 * MiB)
    assert info["can_flush"] and info["can_multi_conn"]
    mapping = json.loads(run("nbdinfo", "--json", "--map", served.uri("v@s1")))
    assert mapping[0] == {"offset": 0, "length": 64 * 1024, "type": 0, "description": "data"}
    assert mapping[1]["offset"] == 64 * 1024 and mapping[1]["type"] == 3  # hole,zero


def test_snapshot_export_reads_the_old_data_and_refuses_writes(served: ServedVolume) -> None:
    requires("qemu-io")
    served.volume.write(0, b"\x01" * MiB)
    served.volume.create_snapshot("before")
    run("qemu-io", "-f", "raw", served.uri(), "-c", "write -P 0x02 0 1M")
    out = run("qemu-io", "-r", "-f", "raw", served.uri("v@before"), "-c", "read -P 0x01 0 1M")
    assert "read 1048576/1048576" in out
    proc = subprocess.run(
        ["qemu-io", "-f", "raw", served.uri("v@before"), "-c", "write -P 0x03 0 4k"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0 and "Permission denied" in proc.stderr  # qemu asks for a writable export
    assert served.volume.read_snapshot("before", 0, 4096) == b"\x01" * 4096


def test_nbdcopy_with_several_connections(served: ServedVolume, tmp_path: Path) -> None:
    requires("nbdcopy")
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(SIZE))
    run("nbdcopy", "-C", "4", "-T", "4", "--requests", "16", str(src), served.uri())
    assert served.volume.read(0, SIZE) == src.read_bytes()
    assert served.server.connections_total >= 4
    run("nbdcopy", served.uri(), str(tmp_path / "back.img"))
    assert (tmp_path / "back.img").read_bytes() == src.read_bytes()


def test_several_clients_at_once(served: ServedVolume) -> None:
    requires("qemu-io")

    def client(k: int) -> str:
        return run(
            "qemu-io", "-f", "raw", served.uri(), "-c", f"write -P {k + 1} {k}M 1M", "-c", f"read -P {k + 1} {k}M 1M"
        )

    with ThreadPoolExecutor(6) as pool:
        outputs = list(pool.map(client, range(6)))
    assert all("read 1048576/1048576" in o for o in outputs)
    for k in range(6):
        assert served.volume.read(k * MiB, MiB) == bytes([k + 1]) * MiB


def test_bad_requests_get_errors_and_the_connection_goes_on(served: ServedVolume) -> None:
    served.volume.write(0, b"ok" * 2048)
    c = RawClient(served.sock, "v")
    for cmd, offset, length, flags in [
        (p.CMD_READ, SIZE - 10, 20, 0),  # past the end
        (p.CMD_READ, 0, 0, 0),  # empty
        (p.CMD_READ, 0, p.MAX_PAYLOAD + 1, 0),  # too large
        (99, 0, 512, 0),  # unknown command
        (p.CMD_READ, 0, 512, 1 << 9),  # unknown flag
        (p.CMD_BLOCK_STATUS, 0, 512, 0),  # no structured replies negotiated
        (p.CMD_FLUSH, 5, 0, 0),  # flush with a range
        (p.CMD_TRIM, SIZE, 1, 0),
    ]:
        c.request(cmd, offset, length, flags)
        err, _ = c.simple_reply()
        assert err in (p.EINVAL, p.EOVERFLOW), (cmd, offset, length, err)
    c.request(p.CMD_WRITE, SIZE - 2, 4, payload=b"abcd")  # payload consumed, stream stays in step
    assert c.simple_reply()[0] == p.ENOSPC
    c.request(p.CMD_READ, 0, 4096)
    assert c.simple_reply(4096) == (0, b"ok" * 2048)
    c.close()


def test_read_only_and_structured_errors(served: ServedVolume) -> None:
    served.volume.create_snapshot("s")
    c = RawClient(served.sock, "v@s", structured=True)
    assert c.flags & p.TF_READ_ONLY
    c.request(p.CMD_WRITE, 0, 4, payload=b"nope")
    assert c.simple_reply()[0] == p.EPERM
    c.request(p.CMD_READ, SIZE, 1)
    kind, body = c.structured_reply()
    assert kind == p.REPLY_TYPE_ERROR and struct.unpack_from(">I", body)[0] == p.EINVAL
    c.request(p.CMD_READ, 0, 512)
    kind, body = c.structured_reply()
    assert kind == p.REPLY_TYPE_OFFSET_DATA and body == struct.pack(">Q", 0) + bytes(512)
    c.close()


def test_broken_streams_close_only_that_connection(served: ServedVolume) -> None:
    c = RawClient(served.sock, "v")
    c.request(p.CMD_READ, 0, 512, magic=0xDEADBEEF)
    with pytest.raises(ConnectionError):
        c.recv(1)
    c.close()
    c = RawClient(served.sock, "v")
    c.request(p.CMD_WRITE, 0, p.MAX_DISCARDABLE + 1)
    assert c.simple_reply()[0] == p.EINVAL
    with pytest.raises(ConnectionError):
        c.recv(1)
    c.close()
    # garbage during option haggling, an unknown export, an unknown option
    c = RawClient.__new__(RawClient)
    import socket

    c.s = socket.socket(socket.AF_UNIX)
    c.s.settimeout(10)
    c.s.connect(str(served.sock))
    c.recv(18)
    c.s.sendall(struct.pack(">I", 3))
    name = b"nosuch"
    assert c.option(p.OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))[-1][0] == p.REP_ERR_UNKNOWN
    assert c.option(p.OPT_GO, b"\x00\x00")[-1][0] == p.REP_ERR_INVALID
    assert c.option(1234)[-1][0] == p.REP_ERR_UNSUP
    assert c.option(p.OPT_SET_META_CONTEXT, struct.pack(">II", 0, 0))[-1][0] == p.REP_ERR_INVALID
    c.s.sendall(b"\x00" * 16)  # not an option at all
    with pytest.raises(ConnectionError):
        c.recv(1)
    c.close()
    c = RawClient(served.sock, "v")  # the server is still there
    c.request(p.CMD_READ, 0, 16)
    assert c.simple_reply(16)[0] == 0
    c.close()


def test_random_requests_never_break_the_server(served: ServedVolume) -> None:
    """Fuzz at the edge (RELIABILITY H1, transmission): random commands, flags, offsets and
    lengths get a reply (data or an error) and the connection stays usable."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    client = RawClient(served.sock, "v")

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        cmd=st.integers(0, 12),
        flags=st.integers(0, 0xFFFF),
        offset=st.one_of(st.integers(0, 2 * SIZE), st.integers(0, 2**64 - 1)),
        length=st.one_of(st.integers(0, 256 * 1024), st.integers(0, 2**32 - 1)),
    )
    def one(cmd: int, flags: int, offset: int, length: int) -> None:
        if cmd == p.CMD_DISC or (cmd == p.CMD_WRITE and length > 256 * 1024):
            return  # a disconnect ends the session; a huge write payload would have to be sent
        payload = bytes(length) if cmd == p.CMD_WRITE else b""
        client.request(cmd, offset, length, flags, payload)
        valid = p.validate(p.Request(p.REQUEST_MAGIC, flags, cmd, 7, offset, length), SIZE, False, False) is None
        err, data = client.simple_reply(length if cmd == p.CMD_READ and valid else 0)
        assert (err == 0) == valid
        if cmd == p.CMD_READ and valid:
            assert data == served.volume.read(offset, length)

    one()
    client.request(p.CMD_READ, 0, 4096)
    assert client.simple_reply(4096)[0] == 0
    client.close()


def test_random_handshakes_never_break_the_server(served: ServedVolume) -> None:
    """RELIABILITY H1, the option phase: random client flags, options (known and unknown, with
    lengths that lie) and raw bytes get well-formed option replies or a closed connection, never
    a hang of the server; a normal client connects after every one."""
    import socket

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    known = st.sampled_from(
        [
            p.OPT_EXPORT_NAME, p.OPT_ABORT, p.OPT_LIST, p.OPT_STARTTLS, p.OPT_INFO, p.OPT_GO,
            p.OPT_STRUCTURED_REPLY, p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT,
        ]
    )  # fmt: skip

    def named(name: bytes) -> bytes:  # the body of NBD_OPT_GO / NBD_OPT_INFO
        return struct.pack(">I", len(name)) + name + struct.pack(">H", 0)

    def honest(option: int, data: bytes) -> bytes:
        return p.OPTION_HEADER.pack(p.IHAVEOPT, option, len(data)) + data

    def lying(option: int, length: int, data: bytes) -> bytes:
        return p.OPTION_HEADER.pack(p.IHAVEOPT, option, length) + data

    payload = st.one_of(st.binary(max_size=64), st.builds(named, st.sampled_from([b"v", b"", b"x" * 300])))
    any_option = st.one_of(known, st.integers(0, 2**32 - 1))
    option = st.one_of(
        st.builds(honest, any_option, payload),
        st.builds(lying, known, st.integers(0, 2**32 - 1), payload),
        st.binary(min_size=1, max_size=40),  # not an option at all
    )

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(flags=st.one_of(st.just(p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES), st.integers(0, 2**32 - 1)),
           options=st.lists(option, max_size=6))  # fmt: skip
    def one(flags: int, options: list[bytes]) -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(served.sock))
            assert len(s.recv(18)) == 18
            s.sendall(struct.pack(">I", flags) + b"".join(options))
            s.shutdown(socket.SHUT_WR)  # nothing more is coming: the server must answer or close
            data = b""
            while chunk := s.recv(65536):  # (a timeout here is a hang: the test fails)
                data += chunk
        pos = 0  # whatever came back is option replies (or, after NBD_OPT_EXPORT_NAME, its answer)
        while pos + p.OPTION_REPLY.size <= len(data):
            magic, _opt, _kind, length = p.OPTION_REPLY.unpack_from(data, pos)
            if magic != p.OPT_REPLY_MAGIC:
                break  # the export-name answer (size and flags) ends the option phase
            pos += p.OPTION_REPLY.size + length
        c = RawClient(served.sock, "v")  # the server still serves
        c.request(p.CMD_READ, 0, 512)
        assert c.simple_reply(512)[0] == 0
        c.close()

    one()


def test_pipelined_small_reads_when_the_client_stops_reading_replies(served: ServedVolume) -> None:
    """Small requests are done in the event loop and their replies written in batches: a client
    that sends many and reads none must not make the server buffer them all."""
    chunk, count = 64 * 1024, 3000  # 188 MiB of replies
    pattern = os.urandom(SIZE)
    served.volume.write(0, pattern)
    c = RawClient(served.sock, served.volume.name)
    requests = b"".join(
        p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_READ, k, k * chunk % SIZE, chunk) for k in range(count)
    )
    sender = threading.Thread(target=c.s.sendall, args=(requests,))
    sender.start()
    time.sleep(1.0)  # the server reads requests and answers until its replies back up

    async def buffered() -> int:
        return sum(w.transport.get_write_buffer_size() for w in served.server._connections)

    held = asyncio.run_coroutine_threadsafe(buffered(), served.loop).result(10)
    assert held <= 2 * MiB  # waits for the client instead of queueing 188 MiB
    seen = set()
    for _ in range(count):
        magic, err, cookie = p.SIMPLE_REPLY.unpack(c.recv(p.SIMPLE_REPLY.size))
        assert (magic, err) == (p.SIMPLE_REPLY_MAGIC, 0)
        offset = cookie * chunk % SIZE
        assert c.recv(chunk) == pattern[offset : offset + chunk]
        seen.add(cookie)
    sender.join(10)
    assert seen == set(range(count))
    c.close()


class _ThreadRecordingExport:
    """A memory export that notes which thread did each read."""

    read_only, description = True, "memory"

    def __init__(self, name: str, inline: bool) -> None:
        self.name, self.inline, self.size = name, inline, MiB
        self.threads: list[str] = []

    def read(self, offset: int, length: int) -> bytes:
        self.threads.append(threading.current_thread().name)
        return bytes(length)

    def allocation(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        yield offset, offset + length, False


def test_small_requests_run_in_the_loop_only_for_exports_that_allow_it(tmp_path: Path) -> None:
    local, remote = _ThreadRecordingExport("local", True), _ThreadRecordingExport("remote", False)
    exports = {"local": local, "remote": remote}
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="nbd-loop", daemon=True)
    thread.start()
    server = NbdServer(lambda: exports, "local")  # type: ignore[arg-type, return-value]
    sock = tmp_path / "nbd.sock"
    asyncio.run_coroutine_threadsafe(server.listen(f"unix:{sock}"), loop).result(10)
    try:
        for name in exports:
            c = RawClient(sock, name)
            for length in (4096, 1 << 20):  # small, then large (always a worker)
                c.request(p.CMD_READ, 0, length)
                assert c.simple_reply(length) == (0, bytes(length))
            c.close()
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        server.executor.shutdown()
    assert local.threads[0] == "nbd-loop" and local.threads[1] != "nbd-loop"
    assert all(t != "nbd-loop" for t in remote.threads) and len(remote.threads) == 2
