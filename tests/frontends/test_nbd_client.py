"""The NBD client backups read through (``NbdSource``), against a real third-party server: nbdkit,
whose thread pool answers requests out of order."""

from __future__ import annotations

import os
import random
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import requires
from umbra.errors import SourceReadError
from umbra.frontends.nbd import client
from umbra.frontends.nbd import protocol as p
from umbra.frontends.nbd.client import open_nbd

KiB, MiB = 1 << 10, 1 << 20
SIZE = 8 * MiB


def _nbdkit(tmp_path: Path, image: Path, *args: str) -> Iterator[tuple[str, Path]]:
    requires("nbdkit")
    sock, log = tmp_path / "nbdkit.sock", tmp_path / "nbdkit.log"
    proc = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "--filter=log", *args, f"logfile={log}"])
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.02)
        yield f"nbd+unix:///?socket={sock}", log
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(SIZE))
    return path


@pytest.fixture
def slow_server(tmp_path: Path, image: Path) -> Iterator[tuple[str, Path]]:
    """nbdkit serving ``image``, every read delayed 5 ms (its thread pool may answer out of order)."""
    yield from _nbdkit(tmp_path, image, "--filter=delay", "file", str(image), "rdelay=5ms")


def _most_in_flight(log: Path) -> int:
    """The most reads the server had under way at once, from nbdkit's log filter."""
    most = now = 0
    for line in log.read_text().splitlines():
        if re.search(r" Read id=\d+ ", line):
            now += 1
            most = max(most, now)
        elif re.search(r" \.\.\.Read id=\d+ ", line):
            now -= 1
    return most


def test_read_many_returns_every_range_in_order_with_reads_under_way(
    slow_server: tuple[str, Path], image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, log = slow_server
    monkeypatch.setattr(p, "MAX_PAYLOAD", 48 * KiB)  # larger ranges go as several requests
    data = image.read_bytes()
    rng = random.Random(5)
    ranges = [(rng.randrange(SIZE), rng.randrange(1, 200 * KiB)) for _ in range(150)]
    ranges += [(SIZE - 10, 100), (0, 0)]  # past the end: cut to the volume; empty
    source = open_nbd(uri)
    try:
        got = list(source.read_many(ranges))
    finally:
        source.close()
    assert got == [data[off : off + n] for off, n in ranges]
    assert _most_in_flight(log) > 4  # pipelined: several reads were under way together


def test_read_many_bounds_the_bytes_in_flight(
    slow_server: tuple[str, Path], image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, log = slow_server
    monkeypatch.setattr(client, "MAX_IN_FLIGHT_BYTES", 256 * KiB)
    source = open_nbd(uri)
    try:
        got = list(source.read_many([(k * 128 * KiB, 128 * KiB) for k in range(20)]))
    finally:
        source.close()
    assert b"".join(got) == image.read_bytes()[: 20 * 128 * KiB]
    assert _most_in_flight(log) == 2


def test_stopping_early_keeps_the_connection_usable(slow_server: tuple[str, Path], image: Path) -> None:
    uri, _ = slow_server
    data = image.read_bytes()
    source = open_nbd(uri)
    try:
        reads = source.read_many([(k * 64 * KiB, 64 * KiB) for k in range(40)])
        assert next(reads) == data[: 64 * KiB]
        reads.close()  # replies to the reads still under way are drained
        assert source.read_at(5 * MiB, 4 * KiB) == data[5 * MiB : 5 * MiB + 4 * KiB]
    finally:
        source.close()


def test_a_read_error_names_its_offset(tmp_path: Path, image: Path) -> None:
    server = _nbdkit(tmp_path, image, "--filter=error", "file", str(image), "error-pread=EIO", "error-pread-rate=100%")
    uri, _ = next(server)
    try:
        source = open_nbd(uri)
        with pytest.raises(SourceReadError, match=r"at offset (3145728|4194304): NBD error 5"):
            list(source.read_many([(3 * MiB, 4 * KiB), (4 * MiB, 4 * KiB)]))
        source.close()
    finally:
        server.close()
