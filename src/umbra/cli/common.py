"""What every command shares: repository and passphrase options, opening, output and progress."""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from umbra.errors import PassphraseMissing, UsageError
from umbra.repo.audit import audit
from umbra.repo.backends import Backend, open_backend
from umbra.repo.cdp import Instant
from umbra.repo.repository import Repository

RepoOption = Annotated[
    str | None, typer.Option("--repo", "-r", envvar="UMBRA_REPO", help="Repository location (or UMBRA_REPO).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print a JSON document instead of text.")]

stdout = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
stderr = Console(stderr=True, highlight=False)


def require_repo(location: str | None) -> str:
    if not location:
        raise UsageError("no repository given: use --repo or set UMBRA_REPO")
    return location


def _secret_from_env(prefix: str) -> str | None:
    """A passphrase from PREFIX, PREFIX_FILE or PREFIX_COMMAND, in that order."""
    if os.environ.get(prefix):
        return os.environ[prefix]
    path = os.environ.get(f"{prefix}_FILE")
    if path:
        try:
            with open(path) as f:
                return f.read().rstrip("\n")
        except OSError as exc:
            raise UsageError(f"cannot read {prefix}_FILE {path}: {exc.strerror}") from exc
    command = os.environ.get(f"{prefix}_COMMAND")
    if command:
        proc = subprocess.run(command, shell=True, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise UsageError(f"{prefix}_COMMAND failed with exit code {proc.returncode}")
        return proc.stdout.rstrip("\n")
    return None


def passphrase() -> str | None:
    """The repository passphrase from the environment, else a prompt on a terminal."""
    secret = _secret_from_env("UMBRA_PASSWORD")
    if secret is None and sys.stdin.isatty():
        secret = getpass.getpass("repository passphrase: ")
    return secret


def new_passphrase() -> str:
    """A new passphrase: UMBRA_NEW_PASSWORD(_FILE/_COMMAND), else asked twice on a terminal."""
    secret = _secret_from_env("UMBRA_NEW_PASSWORD")
    if secret is None and sys.stdin.isatty():
        secret = getpass.getpass("new passphrase: ")
        if getpass.getpass("new passphrase again: ") != secret:
            raise UsageError("the passphrases do not match")
    if not secret:
        raise PassphraseMissing("no new passphrase: set UMBRA_NEW_PASSWORD or run on a terminal")
    return secret


def backend_for(location: str) -> Backend:
    """The backend of ``location``; a backup server's token from UMBRA_TOKEN(_FILE/_COMMAND), its
    certificate authority (when it is not a public one) from UMBRA_CA_FILE."""
    remote = location.startswith(("http://", "https://"))
    token = _secret_from_env("UMBRA_TOKEN") if remote else None
    return open_backend(location, token, os.environ.get("UMBRA_CA_FILE") or None)


@contextmanager
def open_repository(location: str | None) -> Iterator[Repository]:
    repo = Repository.open(backend_for(require_repo(location)), passphrase)
    for message in audit(repo, seen_file(repo.config.id)).messages():
        stderr.print(f"warning: {message}")
    yield repo


def seen_file(repo_id: str) -> Path:
    """Where this machine remembers the points it has seen in a repository (umbra.repo.audit)."""
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "umbra" / "repos" / f"{repo_id}.json"


def warn_if_journal_behind(inst: Instant) -> None:
    """Say so when TIME lies past the newest write shipped for the volume: a write made later and
    not shipped yet (see the lag in `umbra status`) cannot be in the result."""
    p = inst.point
    if not p.cdp.get("journal") or inst.time_ns <= p.state_time_ns:
        return
    if inst.compacted:
        stderr.print(
            f"note: writes after point {p.short_id} of {p.volume} are outside the CDP retention window and "
            "were compacted: this is that point's state"
        )
        return
    through = inst.journal_through_ns
    if through is None:
        stderr.print(f"warning: no journal of {p.volume} was shipped after point {p.short_id}: this is that point")
    elif inst.time_ns > through:
        when = datetime.fromtimestamp(through / 1e9).astimezone().isoformat(timespec="milliseconds")
        stderr.print(f"note: the newest write shipped for {p.volume} is from {when}")


def emit_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


class RichProgress:
    """Progress bar with throughput and ETA on a terminal; silent otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._bar: Progress | None = None
        self._task: Any = None

    def start(self, task: str, total_bytes: int) -> None:
        if not self.enabled:
            return
        self._bar = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=stderr,
            transient=True,
        )
        self._bar.start()
        self._task = self._bar.add_task(task, total=total_bytes)

    def advance(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, nbytes)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def parse_size(text: str) -> int:
    units = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1] if t and t[-1] in "kmg" else ""
    try:
        return int(t[: len(t) - len(unit)]) * units[unit]
    except ValueError:
        raise UsageError(f"cannot read {text!r} as a size (e.g. 64K, 16M)") from None
