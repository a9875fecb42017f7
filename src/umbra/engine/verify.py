"""``umbra verify``: is a point restorable to a filesystem that checks clean?

The point is served as a FUSE block file over a copy-on-write overlay (nothing is restored and the
point never changes), its filesystem is identified with ``blkid``, and the filesystem's own checker
runs on it: for ext2/3/4 the journal is replayed into the overlay first (as a mount after a
crash would), then ``e2fsck -fn`` checks everything; XFS gets its log replayed by a mount through
a loop device (root only), then ``xfs_repair -n``; btrfs
``btrfs check --readonly``, FAT ``fsck.fat -n``.  A btrfs subvolume stored as its send stream is
parsed by ``btrfs receive --dump`` instead (every command and its CRC).  The result of a point (not
of a state between points) is stored in the repository beside it.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from umbra.errors import FileSystemError
from umbra.frontends.exports import OverlayExport, PointExport
from umbra.repo.manifest import Point
from umbra.repo.repository import Repository
from umbra.repo.view import BlockView, open_state
from umbra.volume import btrfs_send

ENV = dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin", LC_ALL="C")
OUTPUT_TAIL = 4000
STREAM_CHUNK = 4 << 20

# filesystem type (blkid) -> [(command before the image path, exit codes that count as success)]
CHECKERS: dict[str, list[tuple[list[str], set[int]]]] = {
    "ext2": [(["e2fsck", "-fn"], {0})],
    "ext3": [(["e2fsck", "-E", "journal_only", "-y"], {0, 1}), (["e2fsck", "-fn"], {0})],
    "ext4": [(["e2fsck", "-E", "journal_only", "-y"], {0, 1}), (["e2fsck", "-fn"], {0})],
    "xfs": [(["xfs_repair", "-n"], {0})],
    "btrfs": [(["btrfs", "check", "--readonly"], {0})],
    "vfat": [(["fsck.fat", "-n"], {0})],
}


@dataclass
class VerifyResult:
    point: str
    state: str
    filesystem: str
    clean: bool
    checked_at: float = field(default_factory=time.time)
    steps: list[dict[str, Any]] = field(default_factory=list)
    stored: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _blkid(path: str) -> str:
    proc = subprocess.run(
        ["blkid", "-p", "-o", "value", "-s", "TYPE", path], capture_output=True, text=True, env=ENV, check=False
    )
    return proc.stdout.strip()


def verify(repo: Repository, ref: str) -> VerifyResult:
    """Check the filesystem of the state ``ref`` names; store the result when it is a point.

    Raises:
        FileSystemError: no filesystem on the volume that umbra knows how to check.
        ServeError: the block file could not be mounted (FUSE).
    """
    inst, view = open_state(repo, ref)
    point = inst.point
    if point.content == btrfs_send.CONTENT:
        result = _verify_send_stream(point, view, ref)
    else:
        result = _verify_filesystem(point, view, ref)
    if not inst.records:  # exactly a point: keep the result with it
        repo.save_verification(point.id, result.to_dict())
        result.stored = True
    return result


def _verify_send_stream(point: Point, view: BlockView, ref: str) -> VerifyResult:
    """A subvolume's send stream: ``btrfs receive --dump`` parses every command and checks its CRC."""
    command = ["btrfs", "receive", "--dump"]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    assert proc.stdin is not None and proc.stderr is not None
    try:
        for offset in range(0, view.size, STREAM_CHUNK):
            proc.stdin.write(view.read(offset, min(STREAM_CHUNK, view.size - offset)))
        proc.stdin.close()
    except BrokenPipeError:
        pass  # it stopped at a damaged command: its exit code and message say where
    errors = proc.stderr.read().decode(errors="replace")[-OUTPUT_TAIL:]
    code = proc.wait()
    result = VerifyResult(point.id, ref, btrfs_send.CONTENT, clean=code == 0)
    result.steps.append({"command": " ".join(command), "exit_code": code, "ok": code == 0, "output": errors})
    return result


def _replay_xfs_log(path: str, mountpoint: str) -> dict[str, Any]:
    """Replay an XFS log into the overlay, as a mount after a crash would: mount and unmount the
    block file through a loop device.  (A filesystem backed up live or frozen has records in its
    log and lazy superblock counters that only a mount brings up to date; ``xfs_repair -n`` would
    report them as damage.  xfsprogs has no tool that replays a log without mounting.)"""
    command = "mount -o nouuid; umount (replays the log)"
    os.makedirs(mountpoint, exist_ok=True)
    attach = subprocess.run(["losetup", "-f", "--show", path], capture_output=True, text=True, env=ENV, check=False)
    if attach.returncode != 0:
        return {"command": command, "exit_code": attach.returncode, "ok": False, "output": attach.stderr[-OUTPUT_TAIL:]}
    loop = attach.stdout.strip()
    try:
        mount = subprocess.run(
            ["mount", "-t", "xfs", "-o", "nouuid", loop, mountpoint],
            capture_output=True,
            text=True,
            env=ENV,
            check=False,
        )
        if mount.returncode == 0:
            subprocess.run(["umount", mountpoint], capture_output=True, env=ENV, check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True, env=ENV, check=False)
    output = (mount.stdout + mount.stderr)[-OUTPUT_TAIL:]
    return {"command": command, "exit_code": mount.returncode, "ok": mount.returncode == 0, "output": output}


def _verify_filesystem(point: Point, view: BlockView, ref: str) -> VerifyResult:
    """fsck of the filesystem on a FUSE block file over a throw-away overlay."""
    from umbra.frontends.fuse_blocks import FuseBlockFiles

    with tempfile.TemporaryDirectory(prefix="umbra-verify-") as tmp:
        overlay = OverlayExport(PointExport(view, point.volume), os.path.join(tmp, "overlay"))
        fuse = FuseBlockFiles(lambda: {point.volume: overlay}, os.path.join(tmp, "mnt"), point.volume)
        fuse.start()
        try:
            path = fuse.image_path()
            fstype = _blkid(path)
            if fstype not in CHECKERS:
                found = f"a {fstype} filesystem" if fstype else "no filesystem blkid knows"
                raise FileSystemError(point=ref, reason=f"{found}; umbra checks {', '.join(sorted(CHECKERS))}")
            result = VerifyResult(point.id, ref, fstype, clean=True)
            if fstype == "xfs":
                result.steps.append(_replay_xfs_log(path, os.path.join(tmp, "xfs")))
                if not result.steps[-1]["ok"]:
                    result.clean = False
                    return result
            for command, ok in CHECKERS[fstype]:
                proc = subprocess.run(
                    [*command, path], capture_output=True, text=True, env=ENV, check=False, stdin=subprocess.DEVNULL
                )
                output = (proc.stdout + proc.stderr)[-OUTPUT_TAIL:]
                passed = proc.returncode in ok
                result.steps.append({"command": " ".join(command), "exit_code": proc.returncode, "ok": passed,
                                     "output": output})  # fmt: skip
                if not passed:
                    result.clean = False
                    break
        finally:
            fuse.stop()
            overlay.close()
    return result
