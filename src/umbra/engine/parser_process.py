"""A filesystem parser in a process of its own: ``ls``, ``extract`` and ``mount --files`` read the
filesystem inside a point through it.

The filesystem came from the backed-up machine (a virtual machine's guest may be hostile) and The
Sleuth Kit that parses it is C.  The parser is a fresh interpreter (never a fork: a fork would
carry the repository's keys, and a mount has threads), started before the first call and again
after a failure.  The child
holds no keys and no repository: it asks the parent for every range of the image it reads, over
its stdin and stdout.  Started as root, it drops to ``nobody`` once its modules are loaded, and its
address space is capped, so a parser subverted by a crafted image holds nothing worth having.

Each call is watched as :func:`~umbra.engine.isolated.run_isolated` watches a job: a crash, a stall
(no part of the image read that was not read before, for ``stall_s``) or a malformed answer fails
that call with one :class:`FileSystemError` (EIO through FUSE, the mount stays up), and the next
call starts a new child.  Answers are plain data (JSON and raw bytes) and are checked before use.
(RELIABILITY H3.)

Wire format, both ways: frames of ``<II`` (header length, payload length), a JSON header, a payload.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import IO, Any, TypeVar

from umbra.engine.files import NewReads
from umbra.engine.isolated import STALL_S, ended_reason, stalled_reason
from umbra.errors import FileSystemError, UmbraError
from umbra.volume.filesystem import KIND_MODE, Entry, FileSystem, FileTree, Reader

T = TypeVar("T")
log = logging.getLogger(__name__)
_FRAME = struct.Struct("<II")
MAX_HEADER = 256 << 20  # a directory of about a million entries
MAX_PAYLOAD = 64 << 20  # a FUSE read is at most a few MiB; the parent asks for no more
CHILD_MEMORY = 4 << 30  # the child's address space (RLIMIT_AS)
READ_BLOCK = 64 << 10  # the child asks for the image in blocks this big (a repository block) ...
READ_BLOCKS = 256  # ... and keeps this many
PIPE_BYTES = 1 << 20  # (Linux's default limit for an unprivileged pipe)
NOBODY = 65534
_ENTRY_INTS = ("inode", "mode", "uid", "gid", "size", "nlink", "atime_ns", "mtime_ns", "ctime_ns")


class _ReaderFailed(Exception):
    """The child must go (crashed, stalled, or answered nonsense); args[0] says why."""


class ParserProcess(FileTree):
    """A :class:`FileTree` answered by a child process.  Thread-safe: one call at a time.

    Raises:
        FileSystemError: from the constructor if the filesystem cannot be read; from a call if the
            child failed on it (crashed, stalled, answered nonsense) or reported damage.
    """

    def __init__(self, read: Reader, size: int, label: str, stall_s: float = STALL_S) -> None:
        self.label = label
        self.stall_s = stall_s
        self.restarts = 0
        self.type_name = ""
        self._size = size
        self._progress = False
        self._read = NewReads(read, size, self._made_progress)
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._root: Entry | None = None
        with self._lock:
            try:
                self._start()
            except BaseException:
                self._stop()
                raise

    # --- the calls ---------------------------------------------------------------------------

    def root(self) -> Entry:
        assert self._root is not None
        return self._root

    def children(self, directory: Entry) -> list[Entry]:
        def check(answer: object, _: bytes) -> list[Entry]:
            if not isinstance(answer, list):
                raise _ReaderFailed("the filesystem reader sent a listing that is not a list")
            return [_entry(doc) for doc in answer]

        return self._call({"op": "children", "entry": entry_to_wire(directory)}, f"listing {_shown(directory)}", check)

    def read_at(self, entry: Entry, offset: int, size: int) -> bytes:
        size = max(0, min(size, entry.size - offset))
        if size == 0:
            return b""

        def check(_: object, data: bytes) -> bytes:
            if len(data) > size:
                raise _ReaderFailed("the filesystem reader sent more data than asked for")
            return data

        request = {"op": "read_at", "entry": entry_to_wire(entry), "offset": offset, "size": size}
        return self._call(request, f"reading {_shown(entry)}", check)

    def data_ranges(self, entry: Entry) -> list[tuple[int, int]] | None:
        def check(answer: object, _: bytes) -> list[tuple[int, int]] | None:
            if answer is None:
                return None
            if not isinstance(answer, list) or not all(_is_range(r, entry.size) for r in answer):
                raise _ReaderFailed("the filesystem reader sent ranges outside the file")
            return [(int(start), int(end)) for start, end in answer]

        return self._call({"op": "data_ranges", "entry": entry_to_wire(entry)}, f"mapping {_shown(entry)}", check)

    def xattrs(self, entry: Entry) -> list[tuple[bytes, bytes]]:
        def check(answer: object, _: bytes) -> list[tuple[bytes, bytes]]:
            if not isinstance(answer, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in answer
            ):
                raise _ReaderFailed("the filesystem reader sent attributes that are not pairs of strings")
            try:
                return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in answer]
            except UnicodeEncodeError:
                raise _ReaderFailed("the filesystem reader sent attributes that are not bytes") from None

        what = f"reading the attributes of {_shown(entry)}"
        return self._call({"op": "xattrs", "entry": entry_to_wire(entry)}, what, check)

    def close(self) -> None:
        with self._lock:
            self._stop()

    def __enter__(self) -> ParserProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """The current child's process id (None between a failure and the next call)."""
        return self._proc.pid if self._proc is not None else None

    # --- the child's lifetime ----------------------------------------------------------------

    def _call(self, request: dict[str, Any], what: str, check: Callable[[object, bytes], T]) -> T:
        with self._lock:
            if self._proc is not None and self._proc.poll() is not None:  # ended while idle: not this call's doing
                code = self._proc.returncode
                log.warning("%s: the filesystem reader ended while idle (status %d); restarting", self.label, code)
                self._stop()
            if self._proc is None:  # the last call ended it: a new child for this one
                self.restarts += 1
                self._start()
            return self._watched(request, what, check)

    def _start(self) -> None:
        """Start a child and open the filesystem in it (the root entry comes back)."""
        self._proc = subprocess.Popen(
            child_command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        for stream in (self._proc.stdin, self._proc.stdout):
            with contextlib.suppress(OSError):  # fewer, larger hand-overs of file data (64 KiB by default)
                fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)  # type: ignore[union-attr]

        def check(answer: object, _: bytes) -> tuple[str, Entry]:
            if not isinstance(answer, dict) or not isinstance(answer.get("type"), str):
                raise _ReaderFailed("the filesystem reader sent an opening answer without a type")
            root = _entry(answer.get("root"))
            if self._root is not None and root.inode != self._root.inode:
                raise _ReaderFailed("the filesystem reader found another root directory than before")
            return answer["type"], root

        request = {"op": "open", "size": self._size, "label": self.label}
        self.type_name, self._root = self._watched(request, "opening the filesystem", check)
        self.root_inode = self._root.inode

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def _watched(self, request: dict[str, Any], what: str, check: Callable[[object, bytes], T]) -> T:
        """One exchange with the child, its answer checked; a failed child is stopped here."""
        proc = self._proc
        assert proc is not None
        try:
            try:
                answer, payload = self._exchange(proc, request)
                return check(answer, payload)
            except OSError as exc:  # the pipe broke: the child died, or closed it
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=self.stall_s)
                raise _ReaderFailed(_ended(proc, 0) if proc.poll() is not None else f"its pipe failed: {exc}") from None
        except _ReaderFailed as exc:
            self._stop()
            log.warning("%s: %s while %s; a new reader starts with the next call", self.label, exc, what)
            raise FileSystemError(point=self.label, reason=str(exc)) from None

    def _exchange(self, proc: subprocess.Popen[bytes], request: dict[str, Any]) -> tuple[object, bytes]:
        """Send one request and serve the child's reads until its answer."""
        assert proc.stdin is not None and proc.stdout is not None
        _send(proc.stdin, request)
        deadline = time.monotonic() + self.stall_s
        while True:
            header, payload = self._receive(proc, deadline)
            if "read" in header:
                serving = time.monotonic()
                self._serve_read(proc.stdin, header["read"])
                deadline += time.monotonic() - serving  # (a slow repository is not the parser's stall)
                if self._progress:
                    self._progress = False
                    deadline = time.monotonic() + self.stall_s
            elif "result" in header:
                return header["result"], payload
            else:
                error = header.get("error")
                if not (isinstance(error, list) and len(error) == 2 and all(isinstance(s, str) for s in error)):
                    raise _ReaderFailed("the filesystem reader sent a message of unknown kind")
                kind, text = error  # (whatever it claims, it is only ever the filesystem's error)
                reason = text if kind == "FileSystemError" else f"the filesystem reader failed: {text}"
                raise FileSystemError(point=self.label, reason=reason)

    def _receive(self, proc: subprocess.Popen[bytes], deadline: float) -> tuple[dict[str, Any], bytes]:
        header_len, payload_len = _FRAME.unpack(self._read_exactly(proc, _FRAME.size, deadline))
        if header_len > MAX_HEADER or payload_len > MAX_PAYLOAD:
            raise _ReaderFailed("the filesystem reader sent an oversized message")
        try:
            header = json.loads(self._read_exactly(proc, header_len, deadline))
        except ValueError:
            raise _ReaderFailed("the filesystem reader sent a message that is not JSON") from None
        if not isinstance(header, dict):
            raise _ReaderFailed("the filesystem reader sent a message that is not an object")
        return header, self._read_exactly(proc, payload_len, deadline)

    def _read_exactly(self, proc: subprocess.Popen[bytes], size: int, deadline: float) -> bytes:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        out = bytearray(size)
        got = 0
        with memoryview(out) as view:
            while got < size:
                ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise _ReaderFailed(stalled_reason(self.stall_s))
                n = os.readv(fd, [view[got:]])
                if not n:
                    raise _ReaderFailed(_ended(proc, self.stall_s))
                got += n
        return bytes(out)

    def _serve_read(self, stream: IO[bytes], request: object) -> None:
        if (
            not isinstance(request, list)
            or len(request) != 2
            or not all(type(n) is int and n >= 0 for n in request)
            or request[1] > MAX_PAYLOAD
        ):
            raise _ReaderFailed("the filesystem reader sent a read request that is not (offset, length)")
        offset, length = request
        try:
            data = self._read(offset, min(length, max(0, self._size - offset)))
        except UmbraError as exc:  # the repository's trouble, not the parser's: it gets an I/O error
            _send(stream, {"error": exc.message})
            return
        _send(stream, {"data": True}, data)

    def _made_progress(self) -> None:
        self._progress = True


def child_command() -> list[str]:
    """The parser's command line: this interpreter, this module."""
    return [sys.executable, "-m", "umbra.engine.parser_process"]


def entry_to_wire(entry: Entry) -> dict[str, Any]:
    """An entry as JSON data (bytes as Latin-1 text: every byte value survives)."""
    doc: dict[str, Any] = {name: getattr(entry, name) for name in _ENTRY_INTS}
    doc.update(
        path=entry.path.decode("latin-1"),
        name=entry.name.decode("latin-1"),
        kind=entry.kind,
        link_target=entry.link_target.decode("latin-1"),
        rdev=list(entry.rdev),
    )
    return doc


def entry_from_wire(doc: object) -> Entry:
    """The entry of :func:`entry_to_wire`, checked field by field.

    Raises:
        ValueError: a field is missing or of the wrong type.
    """
    if not isinstance(doc, dict):
        raise ValueError("an entry that is not an object")
    ints = [doc.get(name) for name in _ENTRY_INTS]
    texts = [doc.get(name) for name in ("path", "name", "link_target")]
    rdev = doc.get("rdev")
    if (
        not all(type(n) is int and n >= 0 for n in ints)
        or not all(isinstance(t, str) for t in texts)
        or doc.get("kind") not in KIND_MODE
        or not (isinstance(rdev, list) and len(rdev) == 2 and all(type(n) is int and n >= 0 for n in rdev))
    ):
        raise ValueError("an entry with a missing or mistyped field")
    try:
        path, name, link = (str(t).encode("latin-1") for t in texts)
    except UnicodeEncodeError:
        raise ValueError("an entry whose names are not bytes") from None
    inode, mode, uid, gid, size, nlink, atime, mtime, ctime = (int(n) for n in ints)  # type: ignore[arg-type]
    return Entry(
        path=path,
        name=name,
        inode=inode,
        kind=str(doc["kind"]),
        mode=mode & 0o7777,
        uid=uid,
        gid=gid,
        size=size,
        nlink=nlink,
        atime_ns=atime,
        mtime_ns=mtime,
        ctime_ns=ctime,
        link_target=link,
        rdev=(int(rdev[0]), int(rdev[1])),
    )


def _entry(doc: object) -> Entry:
    try:
        return entry_from_wire(doc)
    except ValueError as exc:
        raise _ReaderFailed(f"the filesystem reader sent {exc}") from None


def _is_range(r: object, size: int) -> bool:
    """Is ``r`` a [start, end) pair of ints within a file of ``size`` bytes?"""
    return isinstance(r, list) and len(r) == 2 and all(type(n) is int for n in r) and 0 <= r[0] < r[1] <= size


def _shown(entry: Entry) -> str:
    return entry.path.decode(errors="replace")


def _ended(proc: subprocess.Popen[bytes], wait_s: float) -> str:
    """Why the child ended without an answer (it is reaped here; one that closed its output and
    lives on for ``wait_s`` is killed)."""
    try:
        code = proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return "the filesystem reader closed its output without ending"
    return ended_reason(-code if code < 0 else None, code)


def _send(stream: IO[bytes], header: dict[str, Any], payload: bytes = b"") -> None:
    data = json.dumps(header, separators=(",", ":")).encode()
    stream.write(_FRAME.pack(len(data), len(payload)) + data)
    if payload:
        stream.write(payload)
    stream.flush()


def _receive_trusted(stream: IO[bytes]) -> tuple[dict[str, Any], bytes] | None:
    """A frame from the parent (None at its end)."""
    head = stream.read(_FRAME.size)
    if len(head) < _FRAME.size:
        return None
    header_len, payload_len = _FRAME.unpack(head)
    header = json.loads(stream.read(header_len))
    payload = stream.read(payload_len) if payload_len else b""
    return header, payload


# --- the child ---------------------------------------------------------------------------------


class _Child:
    """The parser's side: a :class:`FileSystem` whose reads are the parent's."""

    def __init__(self, inp: IO[bytes], out: IO[bytes]) -> None:
        self.inp, self.out = inp, out
        self.fs: FileSystem | None = None
        self._blocks: OrderedDict[int, bytes] = OrderedDict()  # block number -> its bytes (LRU)

    def read(self, offset: int, length: int) -> bytes:
        """The image's bytes, through a small cache of READ_BLOCK blocks: The Sleuth Kit reads
        a file a few KiB at a time, and every trip to the parent costs two context switches."""
        if length <= 0:
            return b""
        if length > 4 * READ_BLOCK:
            return self._fetch(offset, length)
        first, last = offset // READ_BLOCK, (offset + length - 1) // READ_BLOCK
        missing = [b for b in range(first, last + 1) if b not in self._blocks]
        if missing:
            data = self._fetch(missing[0] * READ_BLOCK, (missing[-1] + 1 - missing[0]) * READ_BLOCK)
            for b in range(missing[0], missing[-1] + 1):
                start = (b - missing[0]) * READ_BLOCK
                self._blocks[b] = data[start : start + READ_BLOCK]
        parts = []
        for b in range(first, last + 1):
            self._blocks.move_to_end(b)
            parts.append(self._blocks[b])
        while len(self._blocks) > READ_BLOCKS:
            self._blocks.popitem(last=False)
        skip = offset - first * READ_BLOCK
        return b"".join(parts)[skip : skip + length]

    def _fetch(self, offset: int, length: int) -> bytes:
        _send(self.out, {"read": [offset, length]})
        frame = _receive_trusted(self.inp)
        if frame is None:
            raise SystemExit(0)  # the parent is gone
        header, payload = frame
        if "error" in header:
            raise OSError(f"cannot read the image at {offset}: {header['error']}")
        return payload

    def answer(self, header: dict[str, Any]) -> tuple[Any, bytes]:
        op = header["op"]
        if op == "open":
            self.fs = FileSystem(self.read, int(header["size"]), str(header["label"]))
            return {"type": self.fs.type_name, "root": entry_to_wire(self.fs.root())}, b""
        assert self.fs is not None, "open comes first"
        entry = entry_from_wire(header["entry"])
        if op == "children":
            return [entry_to_wire(child) for child in self.fs.children(entry)], b""
        if op == "read_at":
            return None, self.fs.read_at(entry, int(header["offset"]), int(header["size"]))
        if op == "data_ranges":
            ranges = self.fs.data_ranges(entry)
            return (None if ranges is None else [list(r) for r in ranges]), b""
        if op == "xattrs":
            return [[name.decode("latin-1"), value.decode("latin-1")] for name, value in self.fs.xattrs(entry)], b""
        raise ValueError(f"unknown request {op!r}")

    def serve(self) -> None:
        while (frame := _receive_trusted(self.inp)) is not None:
            try:
                result, payload = self.answer(frame[0])
                _send(self.out, {"result": result}, payload)
            except FileSystemError as exc:
                _send(self.out, {"error": ["FileSystemError", str(exc.fields.get("reason", exc.message))]})
            except UmbraError as exc:
                _send(self.out, {"error": [type(exc).__name__, exc.message]})
            except Exception as exc:  # noqa: BLE001 - a bug is reported to the parent, the reader goes on
                _send(self.out, {"error": ["", f"{type(exc).__name__}: {exc}"]})


def _confine() -> None:
    """Cap the address space and, as root, become nobody (every module is loaded by now)."""
    import resource

    b"".decode("latin-1")  # load the codec before the files it lives in may be out of reach
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY))
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _confine()
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the frames
    _Child(inp, out).serve()


if __name__ == "__main__":
    main()
