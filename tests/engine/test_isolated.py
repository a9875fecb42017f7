"""The child process that parses filesystems: a crash, a stall, a bug or a subverted child each
end as one FileSystemError in the parent, which goes on (RELIABILITY H3)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from umbra.engine.files import NewReads
from umbra.engine.isolated import Progress, run_isolated
from umbra.errors import ExtractError, FileSystemError


def test_the_answer_comes_back_as_plain_data() -> None:
    assert run_isolated(lambda p: {"entries": [{"name": "a\udcff", "size": 3}], "n": None}, "t") == {
        "entries": [{"name": "a\udcff", "size": 3}],  # (an undecodable name survives as a surrogate)
        "n": None,
    }


def test_a_crash_is_one_error_and_the_parent_goes_on() -> None:
    with pytest.raises(FileSystemError, match=r"crashed \(SIGSEGV\).*damaged or crafted"):
        run_isolated(lambda p: os.kill(os.getpid(), signal.SIGSEGV), "pt")
    assert run_isolated(lambda p: 42, "pt") == 42


def test_a_stalled_reader_is_stopped_but_a_busy_one_is_not() -> None:
    started = time.monotonic()
    with pytest.raises(FileSystemError, match="no progress for 1 s"):
        run_isolated(lambda p: time.sleep(60), "pt", stall_s=1)
    assert time.monotonic() - started < 10  # killed, not waited for

    def busy(progress: Progress) -> str:
        end = time.monotonic() + 2.5  # longer than the stall limit, ticking all along
        while time.monotonic() < end:
            progress.tick()
            time.sleep(0.05)
        return "done"

    assert run_isolated(busy, "pt", stall_s=1) == "done"


def test_errors_keep_their_type_and_bugs_become_filesystem_errors() -> None:
    def refuse(progress: Progress) -> None:
        raise ExtractError(path="/x", reason="it exists")

    with pytest.raises(ExtractError, match="cannot extract /x: it exists"):
        run_isolated(refuse, "pt")
    with pytest.raises(FileSystemError, match="ZeroDivisionError"):
        run_isolated(lambda p: 1 // 0, "pt")
    with pytest.raises(FileSystemError, match=r"without an answer \(exit status 3\)"):
        run_isolated(lambda p: os._exit(3), "pt")
    with pytest.raises(FileSystemError, match="failed: TypeError"):
        run_isolated(lambda p: {b"bytes are not JSON"}, "pt")


def test_a_subverted_child_cannot_send_anything_but_data() -> None:
    def forge(progress: Progress) -> None:
        payload = b"cos\nsystem\n(S'touch /tmp/pwned'\ntR."  # a pickle: not what the parent reads
        os.write(progress._fd, len(payload).to_bytes(8, "little") + payload)
        time.sleep(5)

    with pytest.raises(FileSystemError, match="malformed answer"):
        run_isolated(forge, "pt")

    def claim(progress: Progress) -> None:  # an error naming something that is not an umbra error
        answer = b'["error","Exception","x"]'
        os.write(progress._fd, len(answer).to_bytes(8, "little") + answer)
        time.sleep(5)

    with pytest.raises(FileSystemError, match="reader failed: x"):
        run_isolated(claim, "pt")


def test_only_reads_of_new_parts_of_the_image_count_as_progress() -> None:
    ticks = []
    reads = NewReads(lambda offset, length: bytes(length), 1 << 20, lambda: ticks.append(1))
    reads(0, 4096)
    reads(4096, 4096)  # the same 64 KiB chunk
    assert len(ticks) == 1
    reads(60 * 1024, 8 * 1024)  # across into the second chunk
    assert len(ticks) == 2
    for _ in range(100):  # a loop over the same blocks
        reads(0, 128 * 1024)
    assert len(ticks) == 2
    reads((1 << 20) - 512, 4096)  # past the end: the last chunk, nothing beyond
    assert len(ticks) == 3
