"""Run ``umbra protect`` as a real daemon process for tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from umbra.errors import DaemonUnavailable
from umbra.frontends.control import ControlClient


class Protected:
    def __init__(self, source: Path, name: str, state: Path, *extra: str) -> None:
        self.source, self.name, self.state = source, name, state
        state.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(state.parent / f"protect-{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "umbra", "protect", str(source), "--name", name, "--state", str(state), *extra],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.client = ControlClient(name, state, timeout=30)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.status = self.client.call("status")
                if (state / "volume.json").exists():
                    break
            except DaemonUnavailable:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"protect did not start: {self.output()}")
            time.sleep(0.05)

    @property
    def nbd_uri(self) -> str:
        return f"nbd+unix:///{self.name}?socket={self.state / 'nbd.sock'}"

    @property
    def info(self) -> dict:
        return json.loads((self.state / "volume.json").read_text())

    def output(self) -> str:
        self.log.flush()
        return (self.state.parent / f"protect-{self.name}.log").read_text(errors="replace")

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "umbra", *args, "--state", str(self.state)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        rc = self.proc.wait(timeout)
        self.log.close()
        return rc
