"""Protected-volume benchmarks: umbra's NBD server against `nbdkit file` on the same file, the
loop-over-FUSE path against a plain loop device, journaling cost, and a tracked incremental
against a full backup.  Prints ratios; see bench/RESULTS.md.  Needs root, fio, nbdkit, qemu-utils.

    .venv/bin/python bench/protect.py [--size 1G] [--runtime 10] [--work bench/work] [--journal buffered]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
UMBRA = [sys.executable, "-m", "umbra"]
PATTERNS: list[tuple[str, str, str, tuple[str, ...]]] = [
    ("seq-read-1M", "read", "1M", ()),
    ("seq-write-1M", "write", "1M", ()),
    ("rand-read-4K", "randread", "4k", ()),
    ("rand-write-4K", "randwrite", "4k", ()),
    # a database's pattern: one write at a time, each followed by a flush
    ("rand-write-4K-flush", "randwrite", "4k", ("--iodepth=1", "--fsync=1")),
]


def sh(*cmd: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload]


def wait_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(400):
        if path.exists():
            return
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.returncode}")
        time.sleep(0.05)
    raise SystemExit(f"no socket {path}")


def fio(uri: str, rw: str, bs: str, size: int, runtime: int, *extra: str) -> dict[str, float]:
    out = sh(
        "fio",
        "--name=b",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={rw}",
        f"--bs={bs}",
        "--iodepth=16",
        f"--size={size}",
        f"--runtime={runtime}",
        "--time_based",
        "--output-format=json",
        *extra,  # (later options win)
    )
    job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]  # after "connected to NBD server"
    side = job["read"] if "read" in rw else job["write"]
    return {"MBps": side["bw_bytes"] / 1e6, "lat_us": side["clat_ns"]["mean"] / 1e3, "iops": side["iops"]}


def serve_nbdkit(image: Path, sock: Path) -> subprocess.Popen[bytes]:
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "file", str(image)])
    wait_socket(sock, proc)
    return proc


def serve_umbra(image: Path, state: Path, *extra: str) -> subprocess.Popen[bytes]:
    shutil.rmtree(state, ignore_errors=True)
    proc = subprocess.Popen(
        [*UMBRA, "protect", str(image), "--name", "b", "--state", str(state), *extra], stdout=subprocess.DEVNULL
    )
    wait_socket(state / "control.sock", proc)
    wait_socket(state / "volume.json", proc)  # written once every front end is up (the loop device last)
    time.sleep(0.3)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)


VARIANTS = {"umbra": (), "umbra-no-journal": ("--no-journal",), "umbra-journal-buffered": ("--journal-buffered",)}


def nbd_bench(
    work: Path, image: Path, size: int, runtime: int, variants: list[str], journal_extra: tuple[str, ...] = ()
) -> dict[str, dict[str, dict[str, float]]]:
    results: dict[str, dict[str, dict[str, float]]] = {}
    sock = work / "nbdkit.sock"
    proc = serve_nbdkit(image, sock)
    try:
        results["nbdkit"] = {
            n: fio(f"nbd+unix:///?socket={sock}", rw, bs, size, runtime, *x) for n, rw, bs, x in PATTERNS
        }
    finally:
        stop(proc)
    for label in variants:
        extra = VARIANTS[label] + (() if label == "umbra-no-journal" else journal_extra)
        state = work / f"state-{label}"
        shutil.rmtree(state, ignore_errors=True)  # each run starts with an empty journal
        proc = serve_umbra(image, state, *extra)
        try:
            uri = f"nbd+unix:///b?socket={state / 'nbd.sock'}"
            results[label] = {n: fio(uri, rw, bs, size, runtime, *x) for n, rw, bs, x in PATTERNS}
        finally:
            stop(proc)
    return results


def fs_write(device: str, mnt: Path, mib: int) -> float:
    sh("mkfs.ext4", "-q", "-F", device)
    sh("mount", device, str(mnt))
    try:
        t0 = time.monotonic()
        sh("dd", "if=/dev/zero", f"of={mnt / 'f'}", "bs=1M", f"count={mib}", "conv=fsync")
        return mib * 1.048576 / (time.monotonic() - t0)
    finally:
        sh("umount", str(mnt))


def drop_caches() -> None:
    sh("sync")
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def loop_bench(work: Path, size: int, *extra: str, rounds: int = 3) -> dict[str, object]:
    """ext4 on a plain loop device against ext4 on umbra's loop-over-FUSE, with its journal and with
    ``--no-journal``, ``rounds`` times each, alternating, on a fresh image with the page cache dropped
    before every run (single runs of the plain loop swung between 250 and 1200 MB/s here); the
    ratios are of the medians."""
    mib = size // (1 << 20) // 2
    image = work / "loop.img"
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    runs: dict[str, list[float]] = {"plain": [], "umbra": [], "no-journal": []}
    for _ in range(rounds):
        for variant, results in runs.items():
            image.unlink(missing_ok=True)
            with open(image, "wb") as f:
                f.truncate(size)
            drop_caches()
            if variant == "plain":
                loop = sh("losetup", "-f", "--show", str(image)).stdout.strip()
                try:
                    results.append(fs_write(loop, mnt, mib))
                finally:
                    sh("losetup", "-d", loop)
                continue
            state = work / "state-loop"
            proc = serve_umbra(image, state, "--loop", *(("--no-journal",) if variant == "no-journal" else extra))
            try:
                results.append(fs_write(json.loads((state / "volume.json").read_text())["loop"], mnt, mib))
            finally:
                stop(proc)
    p, u, nj = (statistics.median(runs[v]) for v in ("plain", "umbra", "no-journal"))
    return {
        "plain-loop-MBps": p,
        "fuse-loop-MBps": u,
        "fuse-loop-no-journal-MBps": nj,
        "ratio": u / p,
        "journal-cost": 1 - u / nj,
        "plain-runs": runs["plain"],
        "fuse-runs": runs["umbra"],
        "no-journal-runs": runs["no-journal"],
    }


def backup_bench(work: Path, image: Path, size: int) -> dict[str, float]:
    env = dict(os.environ, UMBRA_STATE_DIR=str(work / "states"), UMBRA_REPO=str(work / "repo"), UMBRA_PASSWORD="bench")
    shutil.rmtree(work / "repo", ignore_errors=True)
    shutil.rmtree(work / "states", ignore_errors=True)
    sh(*UMBRA, "init", env=env)
    proc = subprocess.Popen([*UMBRA, "protect", str(image), "--name", "tb"], env=env, stdout=subprocess.DEVNULL)
    wait_socket(work / "states" / "tb" / "control.sock", proc)
    try:
        t0 = time.monotonic()
        out = sh(*UMBRA, "backup", "tb", "-v", "tb", "--json", env=env).stdout
        full = time.monotonic() - t0
        full_engine = json.loads(out)["results"][0]["stats"]["duration_s"]
        uri = f"nbd+unix:///tb?socket={work / 'states' / 'tb' / 'nbd.sock'}"
        rng = random.Random(3)
        chunk = 64 * 1024
        cmds = []
        for _ in range(size // 100 // chunk):  # 1 % of the volume, in 64 KiB writes
            cmds += ["-c", f"write -P {rng.randrange(256)} {rng.randrange(size // chunk) * chunk} {chunk}"]
        sh("qemu-io", "-f", "raw", uri, *cmds)
        t0 = time.monotonic()
        out = sh(*UMBRA, "backup", "tb", "-v", "tb", "--type", "incremental", "--json", env=env).stdout
        inc = time.monotonic() - t0
        stats = json.loads(out)["results"][0]["stats"]
    finally:
        stop(proc)
    return {
        "full_s": full,
        "incremental_s": inc,
        "ratio": inc / full,
        "tracked": float(stats["tracked"]),
        "full_engine_s": full_engine,
        "incremental_engine_s": stats["duration_s"],
        "engine_ratio": stats["duration_s"] / full_engine,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--work", default=str(HERE / "work" / "protect"))
    ap.add_argument("--only", default="nbd,loop,backup")
    ap.add_argument(
        "--journal",
        default="direct",
        choices=["direct", "buffered"],
        help="the journal mode of the umbra run compared with nbdkit and with --no-journal",
    )
    ap.add_argument(
        "--journal-max",
        help="bound the journal (umbra protect --journal-max): the steady state, where dropped segment "
        "files are recycled",
    )
    args = ap.parse_args()
    journal_extra = ("--journal-max", args.journal_max) if args.journal_max else ()
    size = int(args.size[:-1]) << {"M": 20, "G": 30}[args.size[-1]]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    image = work / "vol.img"
    if not image.exists() or image.stat().st_size != size:
        with open(image, "wb") as f:
            for _ in range(size // (16 << 20)):
                f.write(os.urandom(16 << 20))
    only = set(args.only.split(","))
    report: dict[str, object] = {"size": size}
    if "nbd" in only:
        label = "umbra" if args.journal == "direct" else "umbra-journal-buffered"
        nbd = nbd_bench(work, image, size, args.runtime, [label, "umbra-no-journal"], journal_extra)
        nbd["umbra"] = nbd[label]
        report["nbd"] = nbd
        print(f"journal: {args.journal}" + (f", --journal-max {args.journal_max}" if args.journal_max else ""))
        print(
            f"{'pattern':<20}{'nbdkit MB/s':>12}{'umbra MB/s':>12}{'ratio':>7}{'no-journal':>12}"
            f"{'journal cost':>13}{'lat nbdkit':>12}{'lat umbra':>11}"
        )
        for name, *_ in PATTERNS:
            k, u, nj = nbd["nbdkit"][name], nbd["umbra"][name], nbd["umbra-no-journal"][name]
            cost = 1 - u["MBps"] / nj["MBps"]
            print(
                f"{name:<20}{k['MBps']:>12.0f}{u['MBps']:>12.0f}{u['MBps'] / k['MBps']:>7.2f}{nj['MBps']:>12.0f}"
                f"{cost:>12.0%}{k['lat_us']:>10.0f}us{u['lat_us']:>9.0f}us"
            )
    if "loop" in only:
        loop = loop_bench(work, size, *(("--journal-buffered",) if args.journal == "buffered" else ()), *journal_extra)
        report["loop"] = loop
        print(
            f"ext4 write (dd conv=fsync), medians: plain loop {loop['plain-loop-MBps']:.0f} MB/s, "
            f"umbra FUSE loop {loop['fuse-loop-MBps']:.0f} MB/s, ratio {loop['ratio']:.2f}; "
            f"--no-journal {loop['fuse-loop-no-journal-MBps']:.0f} MB/s, journal cost {loop['journal-cost']:.0%}"
        )
        for key in ("plain-runs", "fuse-runs", "no-journal-runs"):
            print(f"  {key}: {[round(x) for x in loop[key]]}")  # type: ignore[attr-defined]
    if "backup" in only:
        b = backup_bench(work, image, size)
        report["backup"] = b
        print(
            f"backup: full {b['full_s']:.1f} s, incremental after 1 % change {b['incremental_s']:.2f} s, "
            f"ratio {b['ratio']:.3f} (tracked: {bool(b['tracked'])}); in the engine (without process start "
            f"and key derivation) {b['full_engine_s']:.1f} s vs {b['incremental_engine_s']:.2f} s, "
            f"ratio {b['engine_ratio']:.3f}"
        )
    (work / "results.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
