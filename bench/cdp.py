"""Ways back and CDP benchmarks (issue 5): time to first byte of `umbra export` and `umbra mount` for
points of growing size, `umbra extract` of one small file against a full restore, journal shipping
lag under sustained writes, and `VOLUME@TIME` restore time across journal lengths.  Prints ratios;
see bench/RESULTS.md.  Needs root (FUSE), qemu-utils, e2fsprogs, fio (bench/setup.sh).

    .venv/bin/python bench/cdp.py [--sizes 1G,4G] [--rate 50] [--seconds 20] [--only-shipping] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "src"))
from umbra.frontends.control import ControlClient  # noqa: E402 - after the path is set

UMBRA = [sys.executable, "-m", "umbra"]
MiB = 1 << 20


def sh(*cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def iso_ns(ns: int) -> str:
    return datetime.fromtimestamp(ns // 10**9, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{ns % 10**9:09d}Z"


def make_image(path: Path, size: int, work: Path) -> None:
    """An ext4 image about 60 % full of incompressible files, plus one 1 MiB file to extract."""
    tree = work / f"tree-{size}"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    rng = random.Random(size)
    left = int(size * 0.6)
    i = 0
    while left > 0:
        n = min(left, rng.choice([4, 16, 64]) * MiB)
        with open(tree / f"file{i:05d}.bin", "wb") as f:
            f.write(os.urandom(n))
        left -= n
        i += 1
    (tree / "small.txt").write_bytes(os.urandom(MiB))
    with open(path, "wb") as f:
        f.truncate(size)
    sh("mkfs.ext4", "-q", "-F", "-d", str(tree), str(path))
    shutil.rmtree(tree)


def first_byte(cmd: list[str], probe: list[str], env: dict[str, str], ready: Path) -> float:
    """Seconds from starting ``cmd`` until ``probe`` succeeds (a 4 KiB read)."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if ready.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
                return time.monotonic() - started
            if proc.poll() is not None:
                raise SystemExit(f"{cmd[3]} exited with {proc.returncode}")
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def bench_ways_back(size: int, work: Path, env: dict[str, str]) -> dict[str, float]:
    image = work / f"vol-{size}.img"
    make_image(image, size, work)
    volume = f"v{size >> 20}m"
    sh(*UMBRA, "backup", str(image), "--volume", volume, env=env)
    out: dict[str, float] = {}
    sock = work / "export.sock"
    sock.unlink(missing_ok=True)
    uri = f"nbd+unix:///{volume}?socket={sock}"
    out["export_first_byte_s"] = first_byte(
        [*UMBRA, "export", f"{volume}@latest", "--nbd", f"unix:{sock}"],
        ["qemu-io", "-r", "-f", "raw", uri, "-c", "read 0 4k"],
        env,
        sock,
    )
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    out["mount_first_byte_s"] = first_byte(
        [*UMBRA, "mount", f"{volume}@latest", str(mnt)],
        ["dd", f"if={mnt / (volume + '.img')}", "of=/dev/null", "bs=4k", "count=1", "iflag=direct"],
        env,
        mnt / f"{volume}.img",
    )
    for _ in range(100):  # the mount goes away with the process
        if not os.path.ismount(mnt):
            break
        time.sleep(0.05)
    dest = work / "extract"
    shutil.rmtree(dest, ignore_errors=True)
    t = time.monotonic()
    doc = json.loads(sh(*UMBRA, "extract", f"{volume}@latest", "/small.txt", str(dest), "--json", env=env).stdout)
    out["extract_1MiB_s"] = time.monotonic() - t
    out["extract_read_fraction"] = doc["bytes_fetched"] / size
    restored = work / "restored.img"
    restored.unlink(missing_ok=True)
    t = time.monotonic()
    sh(*UMBRA, "restore", f"{volume}@latest", str(restored), env=env)
    out["full_restore_s"] = time.monotonic() - t
    out["extract_vs_restore"] = out["extract_1MiB_s"] / out["full_restore_s"]
    restored.unlink()
    image.unlink()
    return out


def bench_shipping(
    work: Path, env: dict[str, str], rate_mb: float, seconds: float, ship_interval: float
) -> dict[str, float]:
    size = 2 << 30
    image = work / "cdp.img"
    with open(image, "wb") as f:
        f.truncate(size)
    states = work / "states"
    state = states / "cdp"  # where `umbra backup cdp` looks for the protected volume
    shutil.rmtree(states, ignore_errors=True)
    daemon = subprocess.Popen(
        [
            *UMBRA,
            "protect",
            str(image),
            "--name",
            "cdp",
            "--state",
            str(state),
            "--repo",
            env["UMBRA_REPO"],
            "--ship-interval",
            str(ship_interval),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(400):
            if (state / "volume.json").exists():
                break
            time.sleep(0.05)
        control = ControlClient("cdp", state, timeout=30)  # no process per sample: they would load the CPU
        benv = dict(env, UMBRA_STATE_DIR=str(states))
        sh(*UMBRA, "backup", "cdp", "--volume", "cdp", env=benv)
        uri = f"nbd+unix:///cdp?socket={state / 'nbd.sock'}"
        writer = subprocess.Popen(
            [
                "fio", "--name=load", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=64k",
                f"--rate={int(rate_mb)}m", f"--size={size}", f"--runtime={seconds}", "--time_based",
                "--iodepth=4", "--output-format=json",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        lags: list[float] = []
        batch_times: list[float] = []
        marks: list[int] = []
        while writer.poll() is None:
            shipping = control.call("journal")["shipping"]
            lags.append(shipping["lag_s"])
            if shipping["last_batch_s"] is not None:
                batch_times.append(shipping["last_batch_s"])
            marks.append(time.time_ns())
            time.sleep(0.1)
        report = writer.stdout.read() if writer.stdout else "{}"
        written = float(json.loads(report[report.index("{") :])["jobs"][0]["write"]["io_bytes"])
        for _ in range(600):
            if control.call("journal")["shipping"]["pending_records"] == 0:
                break
            time.sleep(0.1)
        lags.sort()
        out = {
            "write_rate_MBps": written / seconds / 1e6,
            "lag_p50_s": lags[len(lags) // 2],
            "lag_p99_s": lags[min(len(lags) - 1, int(len(lags) * 0.99))],
            "lag_max_s": lags[-1],
            "batch_time_p50_s": sorted(batch_times)[len(batch_times) // 2] if batch_times else 0.0,
        }
        for share in (0.1, 0.5, 1.0):
            when = marks[min(len(marks) - 1, int(len(marks) * share))]
            target = work / "at.img"
            target.unlink(missing_ok=True)
            t = time.monotonic()
            sh(*UMBRA, "restore", f"cdp@{iso_ns(when)}", str(target), env=env)
            out[f"restore_at_{int(share * 100)}pct_journal_s"] = time.monotonic() - t
            target.unlink()
        return out
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(120)
        image.unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1G,4G")
    ap.add_argument("--rate", type=float, default=50.0, help="MB/s of writes while shipping")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--work", type=Path, default=HERE / "work-cdp")
    ap.add_argument("--only-shipping", action="store_true")
    ap.add_argument("--ship-interval", type=float, default=0.25)
    args = ap.parse_args()
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = dict(os.environ, UMBRA_REPO=str(work / "repo"), UMBRA_PASSWORD="bench")
    sh(*UMBRA, "init", env=env)
    results: dict[str, dict[str, float]] = {}
    for text in [] if args.only_shipping else args.sizes.split(","):
        results[f"ways back, {text} point"] = bench_ways_back(parse_size(text), work, env)
    results["shipping"] = bench_shipping(work, env, args.rate, args.seconds, args.ship_interval)
    for name, values in results.items():
        print(f"{name}:")
        for key, value in values.items():
            print(f"  {key:32} {value:10.4f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
