"""A real ``umbra serve`` process on a free port, and tokens for it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import urllib3

from umbra.server.tokens import TokenStore, tokens_path

MiB = 1 << 20


class ServerProcess:
    def __init__(self, root: Path, *extra: str) -> None:
        self.root = root
        self.log = root.parent / f"{root.name}.log"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "umbra",
                    "serve",
                    "--root",
                    str(root),
                    "--listen",
                    "127.0.0.1:0",
                    "--json",
                    *extra,
                ],
                stdout=subprocess.PIPE,
                stderr=err,
            )
        assert self.proc.stdout is not None
        text = b""
        deadline = time.monotonic() + 30
        while not text.rstrip().endswith(b"}"):
            line = self.proc.stdout.readline()
            if not line or time.monotonic() > deadline:
                raise AssertionError(f"umbra serve did not start: {self.log.read_text()}")
            text += line
        self.url: str = json.loads(text)["url"]
        self.http = urllib3.PoolManager(retries=False, timeout=30)

    def token(self, repo: str, append_only: bool = False) -> str:
        return TokenStore(tokens_path(self.root)).add(repo, "append" if append_only else "full")[1]

    def admin_token(self) -> str:
        return TokenStore(tokens_path(self.root)).add("", "admin")[1]

    def revoke(self, token: str) -> None:
        TokenStore(tokens_path(self.root)).revoke(token.split("_")[1])

    def request(
        self, method: str, path: str, token: str | None = None, body: bytes | None = None, **headers: str
    ) -> urllib3.BaseHTTPResponse:
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return self.http.request(method, self.url + path, body=body, headers=headers, redirect=False)

    def repo_url(self, name: str) -> str:
        return f"{self.url}/{name}"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code


def cli_env(token: str, **extra: str) -> dict[str, str]:
    return dict(os.environ, UMBRA_TOKEN=token, UMBRA_PASSWORD="secret", **extra)


def umbra(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "umbra", *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def volume(path: Path, seed: int, size: int = 8 * MiB) -> Path:
    path.write_bytes(bytes(size))
    with open(path, "r+b") as f:
        for i in range(0, size, MiB):
            f.seek(i)
            f.write(os.urandom(64 * 1024) if (i // MiB + seed) % 2 else b"\0")
    return path


def alice_with_a_point(server: ServerProcess, tmp_path: Path) -> tuple[str, Path]:
    token = server.token("alice")
    url = server.repo_url("alice")
    env = cli_env(token)
    assert umbra(env, "init", "--repo", url).returncode == 0
    source = volume(tmp_path / "alice.img", seed=1)
    done = umbra(env, "backup", str(source), "--volume", "vol", "--repo", url)
    assert done.returncode == 0, done.stderr
    return token, source
