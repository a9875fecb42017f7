"""The PostgreSQL writer against a real server (RELIABILITY G6): pgbench writes throughout; each of
10 points restores to a cluster that starts, passes pg_amcheck and keeps pgbench's balance invariant;
the backup-complete notification reaches the server after the points are committed."""

from __future__ import annotations

import glob
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import requires
from tests.coordinator_fixtures import ext4_volumes, xfs_host
from tests.loopdev import loop_device, mounted
from umbra.engine import backup_set, restore
from umbra.errors import WriterVeto
from umbra.repo.backends import LocalBackend
from umbra.repo.repository import Repository
from umbra.writers.postgres import PostgresWriter

pytestmark = [pytest.mark.root, pytest.mark.loopdev, pytest.mark.slow]
TRIALS = 10


def pg_bin(tool: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    if not found:
        requires(f"postgresql ({tool})")
    return found[-1]


def as_postgres(*args: str, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", "postgres", "--", *args], capture_output=True, text=True, check=check, **kw)  # type: ignore[call-overload, no-any-return]


@contextmanager
def server(datadir: Path, port: int, sockdir: Path, log: Path) -> Iterator[str]:
    opts = f"-p {port} -k {sockdir} -c listen_addresses='' -c max_wal_size=128MB"
    as_postgres(pg_bin("pg_ctl"), "-D", str(datadir), "-l", str(log), "-o", opts, "-w", "-t", "60", "start")
    try:
        yield f"host={sockdir} port={port} user=postgres dbname=postgres"
    finally:
        as_postgres(pg_bin("pg_ctl"), "-D", str(datadir), "-m", "fast", "-w", "stop", check=False)


def sql(conninfo: str, query: str) -> str:
    return as_postgres(shutil.which("psql") or "psql", conninfo, "-X", "-A", "-t", "-c", query).stdout.strip()


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory the postgres user can traverse (pytest's tmp_path is private to root)."""
    requires("loop", "mkfs.xfs", "runuser")
    pg_bin("postgres")
    d = Path(tempfile.mkdtemp(prefix="umbra-pg-", dir="/tmp"))
    d.chmod(0o755)
    (d / "logs").mkdir()
    shutil.chown(d / "logs", "postgres")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_postgres_under_pgbench_restores_clean(base: Path) -> None:
    repo = Repository.init(LocalBackend(base / "repo"), None, encryption="none")
    sock = base / "sock"
    sock.mkdir()
    shutil.chown(sock, "postgres")
    with xfs_host(base, size=2048 << 20) as host, ext4_volumes(host, base, ["pg"], size=1024 << 20) as mnts:
        data = mnts["pg"] / "data"
        data.mkdir()
        shutil.chown(data, "postgres")
        as_postgres(pg_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
        with server(data, 54391, sock, base / "logs" / "live.log") as live:
            as_postgres(pg_bin("pgbench"), "-i", "-s", "5", "-q", live)
            bench = subprocess.Popen(
                ["runuser", "-u", "postgres", "--", pg_bin("pgbench"), "-n", "-c", "4", "-j", "2", "-T", "600", live],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                time.sleep(2)
                writer = PostgresWriter(live)
                assert writer.metadata()["paths"]["data_directory"] == str(data)
                points = []
                for _ in range(TRIALS):
                    (res,) = backup_set.run(repo, backup_set.SetBackupOptions([str(mnts["pg"])], ["pg"]), [writer])
                    assert res.point.consistency == "application-consistent"
                    points.append(res.point)
                    time.sleep(0.3)
                assert bench.poll() is None, "pgbench kept running through the backups"
            finally:
                bench.terminate()
                bench.wait()
            with pytest.raises(WriterVeto, match="not on a volume of this snapshot set"):
                other = host / "other.img"
                other.write_bytes(bytes(1 << 20))
                backup_set.run(repo, backup_set.SetBackupOptions([str(other)], ["other"]), [PostgresWriter(live)])
        server_log = (base / "logs" / "live.log").read_text()
        for p in points:
            assert f"points {p.id}" in server_log, "backup-complete reached the server, naming the point"
    for i, point in enumerate(points):
        check_restored(repo, point, base, i)


def check_restored(repo: Repository, point: object, base: Path, i: int) -> None:
    out = base / f"restored-{i}.img"
    restore.run(repo, point, str(out))  # type: ignore[arg-type]
    with loop_device(out) as dev, mounted(dev, base / f"r{i}", "rw") as mnt:
        (mnt / "data" / "postmaster.pid").unlink(missing_ok=True)  # the live server's, on this host
        sock = base / f"sock{i}"
        sock.mkdir()
        shutil.chown(sock, "postgres")
        with server(mnt / "data", 54400 + i, sock, base / "logs" / f"restored-{i}.log") as conninfo:
            check = as_postgres(
                pg_bin("pg_amcheck"),
                "--all",
                "--install-missing",
                "--heapallindexed",
                "-h",
                str(sock),
                "-p",
                str(54400 + i),
                "-U",
                "postgres",
                check=False,
            )
            assert check.returncode == 0, f"trial {i}: pg_amcheck failed: {check.stdout} {check.stderr}"
            same = sql(
                conninfo,
                "SELECT (SELECT sum(abalance) FROM pgbench_accounts) = (SELECT sum(bbalance) FROM pgbench_branches)",
            )
            assert same == "t", f"trial {i}: pgbench balances disagree"
            assert int(sql(conninfo, "SELECT count(*) FROM pgbench_history")) > 0
    out.unlink()
