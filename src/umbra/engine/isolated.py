"""Run a filesystem parser in a child process that may crash or hang without taking umbra along.

The filesystem fuzzing harness (:mod:`umbra.testing.fsfuzz`) feeds mutated images to The Sleuth
Kit, C code that a crafted image could crash or send into a loop.  (The commands themselves parse
through :mod:`umbra.engine.parser_process`, which holds no keys.)  :func:`run_isolated` forks, runs
the job in the child and
watches it: the child reports progress (new blocks read, entries found, file data written), and a
child that makes none for ``stall_s`` seconds is killed.  A crash or a stall becomes one
:class:`FileSystemError`; an umbra error raised in the child is raised again in the parent.
Answers come back as JSON (plain data, never pickles: a child subverted by its input must not be
able to run code in the parent). (RELIABILITY H3.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import struct
import time
from collections.abc import Callable
from typing import Any, TypeVar

from umbra import errors
from umbra.errors import FileSystemError, UmbraError

T = TypeVar("T")
log = logging.getLogger(__name__)
STALL_S = 10.0  # seconds without progress before the parser is taken to be stuck
BEAT_S = 0.5  # the child reports progress at most this often
_HEAD = struct.Struct("<Q")


class Progress:
    """Given to the job: ``tick()`` whenever it gets somewhere (cheap; sends at most every BEAT_S)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._last = 0.0

    def tick(self) -> None:
        now = time.monotonic()
        if now - self._last >= BEAT_S:
            self._last = now
            _send(self._fd, ("beat",))


def run_isolated(job: Callable[[Progress], T], what: str, stall_s: float = STALL_S) -> T:
    """``job(progress)`` in a forked child; its result (JSON data: dicts, lists, strings, numbers)
    comes back.

    Raises:
        FileSystemError: the child crashed, stalled, or returned nothing; or what ``job`` raised
            (an :class:`UmbraError`, rebuilt with its message).
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_fd)
        _child(job, write_fd)
    os.close(write_fd)
    try:
        message = _watch(read_fd, pid, what, stall_s)
    finally:
        os.close(read_fd)
    if message[0] == "result" and len(message) == 2:
        return message[1]  # type: ignore[no-any-return]
    if message[0] != "error" or len(message) != 3 or not all(isinstance(m, str) for m in message):
        raise FileSystemError(point=what, reason="the filesystem reader sent a malformed answer")
    raise rebuilt_error(message[1], message[2], what)


def rebuilt_error(name: str, text: str, what: str) -> UmbraError:
    """The umbra error a child reported (class name and message): of the same class when that
    takes just a message, else a FileSystemError."""
    cls = getattr(errors, name, None) if name.isidentifier() else None
    if isinstance(cls, type) and issubclass(cls, UmbraError) and cls.__init__ is UmbraError.__init__:
        return cls(text)
    return FileSystemError(point=what, reason=f"the filesystem reader failed: {text}")


def stalled_reason(stall_s: float) -> str:
    return (
        f"the filesystem reader made no progress for {stall_s:.0f} s and was stopped (a damaged or crafted filesystem?)"
    )


def ended_reason(signum: int | None, code: int) -> str:
    """Why a child ended without an answer: killed by ``signum``, or exited with ``code``."""
    if signum is not None:
        return (
            f"the filesystem reader crashed ({signal.Signals(signum).name}): "
            "the filesystem in this point is damaged or crafted"
        )
    return f"the filesystem reader ended without an answer (exit status {code})"


def _child(job: Callable[[Progress], Any], fd: int) -> None:
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends the child with the parent
        try:
            answer: tuple[Any, ...] = ("result", job(Progress(fd)))
            data = json.dumps(answer, separators=(",", ":")).encode()
        except UmbraError as exc:
            data = json.dumps(("error", type(exc).__name__, exc.message)).encode()
        except Exception as exc:
            log.debug("the isolated job failed", exc_info=True)
            data = json.dumps(("error", "", f"{type(exc).__name__}: {exc}")).encode()
        _write(fd, data)
        code = 0
    finally:
        os._exit(code)  # no atexit handlers, no flushing of the parent's buffers


def _send(fd: int, message: tuple[Any, ...]) -> None:
    _write(fd, json.dumps(message, separators=(",", ":")).encode())


def _write(fd: int, data: bytes) -> None:
    view = memoryview(_HEAD.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def _watch(fd: int, pid: int, what: str, stall_s: float) -> list[Any]:
    """Read the child's messages until its answer; kill it if it stalls."""
    buf = bytearray()
    deadline = time.monotonic() + stall_s
    reaped = False
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise FileSystemError(point=what, reason=stalled_reason(stall_s))
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                reaped = True
                raise FileSystemError(point=what, reason=_ended(pid))
            buf += chunk
            deadline = time.monotonic() + stall_s
            while len(buf) >= _HEAD.size and len(buf) >= _HEAD.size + _HEAD.unpack_from(buf)[0]:
                size = _HEAD.unpack_from(buf)[0]
                try:
                    message = json.loads(bytes(buf[_HEAD.size : _HEAD.size + size]))
                except ValueError:
                    message = None
                del buf[: _HEAD.size + size]
                if not isinstance(message, list) or not message:
                    raise FileSystemError(point=what, reason="the filesystem reader sent a malformed answer")
                if message != ["beat"]:
                    return message
    finally:
        if not reaped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # (it has ended, or is about to, once it has answered)
            os.waitpid(pid, 0)


def _ended(pid: int) -> str:
    """Why the child ended without an answer (it is reaped here)."""
    _, status = os.waitpid(pid, 0)
    signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    return ended_reason(signum, os.waitstatus_to_exitcode(status))
