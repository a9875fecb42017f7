"""Access tokens of the backup server: each opens one repository, for everything (``full``) or for
backing up only (``append``: read, and add objects; never delete or replace what exists); or none
(``admin``: the web UI and the statistics, never a repository's objects).

A token reads ``umbra_<id>_<secret>``: the id names its entry in the tokens file, the secret (32
random bytes) is kept there only as its SHA-256 (a secret that random needs no slow hash) and is
compared in constant time.  The server reads the file again whenever it changes, so a revoked
token stops working with the next request.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from umbra.errors import UsageError
from umbra.repo.backends.local import atomic_write

ROLES = ("full", "append", "admin")
ALL_REPOS = "*"  # the repository field of admin tokens: they open none
REPO_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_TOKEN = re.compile(r"umbra_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")


def tokens_path(root: Path) -> Path:
    """The tokens file of a server directory."""
    return root / "tokens.json"


@dataclass(frozen=True)
class Token:
    id: str
    repo: str
    role: str
    secret_sha256: str
    created: str
    label: str = ""


class TokenStore:
    """The tokens file (JSON, mode 0600), read again when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._tokens: dict[str, Token] = {}

    def tokens(self) -> dict[str, Token]:
        """The tokens as the file holds them now (read again if it changed; none if it is gone)."""
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                self._tokens = self._read() if stamp is not None else {}
                self._stamp = stamp
            return self._tokens

    def verify(self, presented: str) -> Token | None:
        """The token ``presented`` stands for, or None."""
        match = _TOKEN.fullmatch(presented)
        if match is None:
            return None
        token = self.tokens().get(match.group(1))
        digest = hashlib.sha256(match.group(2).encode()).hexdigest()
        if token is None or not hmac.compare_digest(digest, token.secret_sha256):
            return None
        return token

    def add(self, repo: str, role: str, label: str = "") -> tuple[Token, str]:
        """A new token for ``repo``: (its entry, the token to hand out, shown only now)."""
        if role == "admin":
            repo = ALL_REPOS
        elif not REPO_NAME.fullmatch(repo):
            raise UsageError(f"repository name {repo!r}: use lower-case letters, digits, '-' and '_' (at most 64)")
        if role not in ROLES:
            raise UsageError(f"role {role!r}: one of {', '.join(ROLES)}")
        token_id = secrets.token_hex(8)
        secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        entry = Token(
            id=token_id,
            repo=repo,
            role=role,
            secret_sha256=hashlib.sha256(secret.encode()).hexdigest(),
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            label=label,
        )
        with self._editing():
            self._write({**self._read(), token_id: entry})
        return entry, f"umbra_{token_id}_{secret}"

    def revoke(self, token_id: str) -> Token:
        with self._editing():
            tokens = self._read()
            entry = tokens.pop(token_id, None)
            if entry is None:
                raise UsageError(f"no token {token_id} in {self.path}")
            self._write(tokens)
        return entry

    @contextlib.contextmanager
    def _editing(self) -> Iterator[None]:
        """One change to the file at a time, across processes (``flock`` on a lock file beside it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read(self) -> dict[str, Token]:
        try:
            doc = json.loads(self.path.read_text())
            return {t["id"]: Token(**t) for t in doc["tokens"]}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"tokens file {self.path} is unreadable: {exc}") from None

    def _write(self, tokens: dict[str, Token]) -> None:
        data = json.dumps({"tokens": [asdict(t) for t in tokens.values()]}, indent=1).encode()
        atomic_write(self.path, data, replace=True)  # (created 0600)
