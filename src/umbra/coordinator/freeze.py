"""FIFREEZE / FITHAW (the flush-and-hold step) and the watchdog that guarantees the thaw.

A process writing to a frozen filesystem sleeps uninterruptibly until the thaw, so a thaw must never
be missed, not even if umbra is killed with SIGKILL mid-commit.  Before freezing, the coordinator
starts a watchdog process in its own session holding open descriptors of the mount points; it
thaws them itself if umbra's pipe closes (umbra died) or the commit deadline passes, whichever
comes first.  umbra tells it "released" after its own thaw, and the watchdog exits.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import subprocess
import sys
import time

FIFREEZE = 0xC0045877
FITHAW = 0xC0045878


def freeze(fd: int) -> None:
    fcntl.ioctl(fd, FIFREEZE, 0)


def thaw(fd: int) -> bool:
    """Thaw; False if it was not frozen (EINVAL)."""
    try:
        fcntl.ioctl(fd, FITHAW, 0)
        return True
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise


class Watchdog:
    """Handle on a running watchdog process."""

    def __init__(self, mountpoints: list[str], deadline_s: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "umbra.coordinator.freeze", str(deadline_s), *mountpoints],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,  # survives a kill of umbra's process group too
            close_fds=True,
        )
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline()
        if ready.strip() != b"ready":
            self.proc.kill()
            raise RuntimeError(f"freeze watchdog did not start ({ready!r})")

    def released(self) -> bool:
        """Tell the watchdog all is thawed; returns False if it had to thaw on its own (deadline)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(b"released\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it already exited after the deadline; its answer below says so
        answer = self.proc.stdout.readline().strip()
        self.proc.wait()
        return answer == b"ok"


def _watch(deadline_s: float, mountpoints: list[str]) -> int:
    fds = [os.open(m, os.O_RDONLY | os.O_DIRECTORY) for m in mountpoints]
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    end = time.monotonic() + deadline_s
    verdict = "deadline"
    while True:
        left = end - time.monotonic()
        if left <= 0:
            break
        readable, _, _ = select.select([sys.stdin], [], [], left)
        if readable:
            line = sys.stdin.readline()
            verdict = "ok" if line.strip() == "released" else "parent-died"
            break
    thawed = [m for m, fd in zip(mountpoints, fds, strict=True) if thaw(fd)]
    if verdict == "ok" and thawed:
        verdict = "late"  # umbra said released, but something was still frozen
    if thawed:
        sys.stderr.write(f"umbra watchdog: thawed {', '.join(thawed)} ({verdict})\n")
    try:
        sys.stdout.write(f"{verdict}\n")
        sys.stdout.flush()
    except BrokenPipeError:
        pass  # umbra is gone: nobody to tell
    return 0


if __name__ == "__main__":
    sys.exit(_watch(float(sys.argv[1]), sys.argv[2:]))
