"""The parser process behind ``mount --files``: the same answers as the parser in process; a crash,
a stall or a subverted child fails one call, and the next call gets a new child (RELIABILITY H3)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import requires
from tests.engine.helpers import special_tree
from umbra.engine import parser_process
from umbra.engine.parser_process import ParserProcess, entry_from_wire, entry_to_wire
from umbra.errors import FileSystemError, RepositoryIOError
from umbra.testing.volumes import make_ext4
from umbra.volume.filesystem import Entry, FileSystem

MiB = 1 << 20
SIZE = 32 * MiB


@pytest.fixture
def image(tmp_path: Path) -> Path:
    requires("mkfs.ext4")
    return make_ext4(tmp_path / "fs.img", SIZE, special_tree(tmp_path / "tree"), garbage=False)


def reader(path: Path):  # type: ignore[no-untyped-def]
    fd = os.open(path, os.O_RDONLY)
    return lambda offset, length: os.pread(fd, length, offset)


def walk(fs: FileSystem | ParserProcess) -> dict[bytes, tuple[Entry, bytes, list[tuple[bytes, bytes]]]]:
    out = {}
    todo = [fs.root()]
    while todo:
        directory = todo.pop()
        for entry in fs.children(directory):
            data = b""
            if entry.kind == "file":
                data = b"".join(fs.read_at(entry, off, 64 * 1024) for off in range(0, entry.size, 64 * 1024))
            elif entry.kind == "dir":
                todo.append(entry)
            out[entry.path] = (entry, data, fs.xattrs(entry))
    return out


def test_answers_equal_the_parser_in_process(image: Path) -> None:
    parser = ParserProcess(reader(image), SIZE, "fs")
    try:
        here = walk(FileSystem(reader(image), SIZE, "fs"))
        there = walk(parser)
        assert parser.type_name == "ext4"
        assert there == here
        assert there[b"/plain.txt"][2] == [(b"user.colour", b"blue")]
        assert len(there[b"/random.bin"][1]) == 300_000
        assert parser.restarts == 0
    finally:
        parser.close()


def test_entries_survive_the_wire_byte_for_byte() -> None:
    entry = Entry(
        path=b"/d/\xff\x00name",
        name=b"\xff\x00name",
        inode=12,
        kind="char",
        mode=0o4755,
        uid=1,
        gid=2,
        size=3,
        nlink=4,
        atime_ns=5,
        mtime_ns=6,
        ctime_ns=7,
        link_target=b"\x80",
        rdev=(1, 3),
    )
    assert entry_from_wire(entry_to_wire(entry)) == entry
    for bad in ({**entry_to_wire(entry), "kind": "door"}, {**entry_to_wire(entry), "size": -1}, [], {"inode": True}):
        with pytest.raises(ValueError):
            entry_from_wire(bad)


def call_while_stopped(parser: ParserProcess, then: list[signal.Signals]) -> BaseException | None:
    """Stop the child, start a call, send ``then`` (in order); what the call raised."""
    pid = parser.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    raised: list[BaseException] = []

    def call() -> None:
        try:
            parser.children(parser.root())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            raised.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(0.3)
    for sig in then:
        os.kill(pid, sig)
    thread.join(30)
    assert not thread.is_alive()
    return raised[0] if raised else None


def test_a_crash_fails_that_call_and_the_next_gets_a_new_reader(image: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    parser = ParserProcess(reader(image), SIZE, "point abc of fs")
    try:
        first = parser.pid
        error = call_while_stopped(parser, [signal.SIGSEGV, signal.SIGCONT])
        assert isinstance(error, FileSystemError)
        assert "point abc of fs: the filesystem reader crashed (SIGSEGV)" in error.message
        assert "while listing /" in caplog.text
        assert parser.pid is None  # reaped
        with pytest.raises(ProcessLookupError):
            os.kill(first, 0)  # type: ignore[arg-type]
        assert b"plain.txt" in [e.name for e in parser.children(parser.root())]
        assert parser.restarts == 1 and parser.pid not in (None, first)
    finally:
        parser.close()


def test_a_stalled_reader_is_stopped_within_its_limit(image: Path) -> None:
    parser = ParserProcess(reader(image), SIZE, "fs", stall_s=1)
    try:
        started = time.monotonic()
        error = call_while_stopped(parser, [])
        assert isinstance(error, FileSystemError)
        assert "made no progress for 1 s" in error.message
        assert time.monotonic() - started < 10
        assert [e.name for e in parser.children(parser.root())]  # a new reader answers
    finally:
        parser.close()


def test_a_reader_that_ended_while_idle_is_replaced_without_an_error(image: Path) -> None:
    parser = ParserProcess(reader(image), SIZE, "fs")
    try:
        pid = parser.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        assert b"plain.txt" in [e.name for e in parser.children(parser.root())]
        assert parser.restarts == 1
    finally:
        parser.close()


def test_image_read_errors_reach_the_parser_and_come_back_as_one_error(image: Path) -> None:
    plain = reader(image)
    failing = {"on": False}

    def flaky(offset: int, length: int) -> bytes:
        if failing["on"]:
            raise RepositoryIOError(name="data/ab/cd", reason="injected")
        return plain(offset, length)

    parser = ParserProcess(flaky, SIZE, "fs")
    try:
        big = next(e for e in parser.children(parser.root()) if e.name == b"random.bin")
        failing["on"] = True
        with pytest.raises(FileSystemError, match=r"^fs: cannot read /random\.bin at 262144"):
            parser.read_at(big, 256 * 1024, 4096)  # (not in the parser's cache of what it read)
        failing["on"] = False
        assert len(parser.read_at(big, 0, 4096)) == 4096
        assert parser.restarts == 0  # damage is an answer, not a failed reader
    finally:
        parser.close()


def test_the_reader_is_confined(image: Path) -> None:
    parser = ParserProcess(reader(image), SIZE, "fs")
    try:
        status = Path(f"/proc/{parser.pid}/status").read_text()
        limits = Path(f"/proc/{parser.pid}/limits").read_text()
        assert f"{parser_process.CHILD_MEMORY}" in next(line for line in limits.splitlines() if "address space" in line)
        if os.geteuid() == 0:
            uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
            assert uid_line.split()[1:] == [str(parser_process.NOBODY)] * 4
    finally:
        parser.close()


# A subverted child: answers the opening like a real one, then sends what the scenario says.
SUBVERTED = r"""
import json, struct, sys
scenario = sys.argv[1]
inp, out = sys.stdin.buffer, sys.stdout.buffer
def send(header, payload=b""):
    data = json.dumps(header).encode()
    out.write(struct.pack("<II", len(data), len(payload)) + data + payload); out.flush()
def receive():
    n, m = struct.unpack("<II", inp.read(8)); h = json.loads(inp.read(n)); inp.read(m); return h
root = {"path": "/", "name": "/", "inode": 2, "kind": "dir", "mode": 493, "uid": 0, "gid": 0, "size": 1024,
        "nlink": 2, "atime_ns": 0, "mtime_ns": 0, "ctime_ns": 0, "link_target": "", "rdev": [0, 0]}
receive(); send({"result": {"type": "ext4", "root": root}})
receive()
if scenario == "entry":
    send({"result": [{**root, "kind": "door"}]})
elif scenario == "huge":
    out.write(struct.pack("<II", 1 << 31, 0)); out.flush()
elif scenario == "read":
    send({"read": [-5, 10]})
elif scenario == "json":
    out.write(struct.pack("<II", 3, 0) + b"{{{"); out.flush()
elif scenario == "error":
    send({"error": ["RepositoryNotFound", "a lie"]})
elif scenario == "close":
    import os, time
    out.close(); os.close(1); time.sleep(60)
sys.stdin.read()
"""


@pytest.mark.parametrize(
    ("scenario", "message"),
    [
        ("entry", "sent an entry with a missing or mistyped field"),
        ("huge", "sent an oversized message"),
        ("read", "sent a read request that is not"),
        ("json", "sent a message that is not JSON"),
        ("close", "closed its output without ending"),
    ],
)
def test_a_subverted_reader_is_one_error(
    scenario: str, message: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    script = tmp_path / "subverted.py"
    script.write_text(SUBVERTED)
    monkeypatch.setattr(parser_process, "child_command", lambda: [sys.executable, str(script), scenario])
    parser = ParserProcess(lambda o, n: bytes(n), SIZE, "fs", stall_s=1)
    try:
        with pytest.raises(FileSystemError, match=message):
            parser.children(parser.root())
        assert parser.pid is None  # stopped
    finally:
        parser.close()


def test_an_error_a_subverted_reader_claims_is_still_only_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    script = tmp_path / "subverted.py"
    script.write_text(SUBVERTED)
    monkeypatch.setattr(parser_process, "child_command", lambda: [sys.executable, str(script), "error"])
    parser = ParserProcess(lambda o, n: bytes(n), SIZE, "fs")
    try:
        with pytest.raises(FileSystemError, match="a lie"):  # rebuilt as the filesystem's error
            parser.children(parser.root())
    finally:
        parser.close()


def test_a_slow_repository_is_not_the_parsers_stall(image: Path) -> None:
    """Reads of parts already read are no progress; the time the repository takes to deliver
    them is not held against the parser either."""
    plain = reader(image)
    slow = {"on": False}

    def sluggish(offset: int, length: int) -> bytes:
        if slow["on"]:
            time.sleep(0.3)
        return plain(offset, length)

    parser = ParserProcess(sluggish, SIZE, "fs", stall_s=0.5)
    try:
        big = next(e for e in parser.children(parser.root()) if e.name == b"random.bin")
        data = parser.read_at(big, 0, big.size)
        os.kill(parser.pid, signal.SIGKILL)  # type: ignore[arg-type]
        time.sleep(0.2)
        slow["on"] = True  # the new parser reads only what the first one read, each part slowly
        assert parser.read_at(big, 0, big.size) == data
        assert parser.restarts == 1
    finally:
        parser.close()
