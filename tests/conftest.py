"""Test isolation, capability detection and the strict-skip rule.

Every test runs with ``UMBRA_*`` removed from the environment, a weak KDF and tiny packs (so small
data exercises multi-pack paths).  Tests needing root, loop devices or a tool call ``requires(...)``;
the report header lists what is enabled.  With ``UMBRA_TEST_REQUIRE_ALL=1`` (CI) a capability skip
fails the test, unless the capability is named in ``tests/allowed_skips.txt`` with a reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.helpers import ServerProcess
from umbra.repo.backends import LocalBackend, MemBackend
from umbra.repo.backends.base import Backend
from umbra.repo.backends.http import HttpBackend
from umbra.repo.repository import Repository

HERE = Path(__file__).parent
os.environ["PATH"] = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def _loop_ok() -> bool:
    if os.geteuid() != 0 or not shutil.which("losetup"):
        return False
    return subprocess.run(["losetup", "-f"], capture_output=True, check=False).returncode == 0


FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"  # Debian package libfaketime
CAPABILITIES = {
    "root": os.geteuid() == 0,
    "loop": _loop_ok(),
    "mkfs.ext4": shutil.which("mkfs.ext4") is not None,
    "debugfs": shutil.which("debugfs") is not None,
    "dumpe2fs": shutil.which("dumpe2fs") is not None,
    "libfaketime": os.path.exists(FAKETIME_LIB),
}


def _allowed_skips() -> dict[str, str]:
    path = HERE / "allowed_skips.txt"
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                name, _, reason = line.partition(" ")
                out[name] = reason.strip()
    return out


def requires(*names: str) -> None:
    """Skip (or, in CI, fail) unless every named capability is present."""
    missing = [n for n in names if not CAPABILITIES.get(n, shutil.which(n) is not None)]
    if not missing:
        return
    allowed = _allowed_skips()
    if os.environ.get("UMBRA_TEST_REQUIRE_ALL") == "1" and any(m not in allowed for m in missing):
        pytest.fail(f"required capability missing in CI: {', '.join(missing)}")
    pytest.skip(f"missing: {', '.join(missing)}")


def pytest_report_header(config: pytest.Config) -> str:
    on = sorted(k for k, v in CAPABILITIES.items() if v)
    off = sorted(k for k, v in CAPABILITIES.items() if not v)
    return f"umbra capabilities enabled: {', '.join(on) or '-'}; disabled: {', '.join(off) or '-'}"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("UMBRA_") and name != "UMBRA_TEST_REQUIRE_ALL":
            monkeypatch.delenv(name)
    monkeypatch.setenv("UMBRA_TESTONLY_WEAK_KDF", "1")
    monkeypatch.setenv("UMBRA_TESTONLY_PACK_TARGET", str(256 * 1024))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture(scope="session")
def backup_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real ``umbra serve`` for the session; each test takes repositories of its own."""
    server = ServerProcess(tmp_path_factory.mktemp("server") / "root")
    yield server
    server.stop()


@pytest.fixture(params=["mem", "local", "http"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "mem":
        return MemBackend()
    if request.param == "http":
        server = request.getfixturevalue("backup_server")
        name = f"contract-{uuid.uuid4().hex[:12]}"
        return HttpBackend(server.repo_url(name), server.token(name))
    return LocalBackend(tmp_path / "repo")


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    """An encrypted local repository with 4 KiB blocks and fan-out 8 (deep trees on small data)."""
    return Repository.init(LocalBackend(tmp_path / "repo"), "secret", block_size=4096, fanout=8)
