"""The protect daemon's control channel: one JSON object per line over a unix socket.

The daemon answers ``{"ok": RESULT}`` or ``{"error": {"type": CLASS, "message": TEXT}}``; the
client turns an error back into the umbra exception of that class, so ``umbra snapshot create``
fails with the same message and exit code as the daemon's own check.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from umbra.errors import DaemonUnavailable, ProtectError, UmbraError, all_error_classes

MAX_LINE = 16 << 20


def state_root() -> Path:
    """Where protected volumes keep their state by default (``UMBRA_STATE_DIR`` overrides)."""
    env = os.environ.get("UMBRA_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/umbra/protect")
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "umbra" / "protect"


def state_dir_for(volume: str, state: str | None = None) -> Path:
    return Path(state) if state else state_root() / volume


def encode_error(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, UmbraError):
        return {"error": {"type": type(exc).__name__, "message": exc.message}}
    return {"error": {"type": "ProtectError", "message": f"{type(exc).__name__}: {exc}"}}


def decode_error(doc: dict[str, Any]) -> UmbraError:
    by_name = {cls.__name__: cls for cls in all_error_classes()}
    cls = by_name.get(doc.get("type", ""), ProtectError)
    err = cls.__new__(cls)
    UmbraError.__init__(err, str(doc.get("message", "unknown error")))
    return err


class ControlClient:
    def __init__(self, volume: str, state_dir: Path, timeout: float = 60.0) -> None:
        self.volume = volume
        self.path = state_dir / "control.sock"
        self.timeout = timeout

    def call(self, op: str, **args: Any) -> Any:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            try:
                sock.connect(str(self.path))
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise DaemonUnavailable(volume=self.volume, socket=str(self.path)) from exc
            sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    raise ProtectError(volume=self.volume, reason=f"the daemon closed the connection during {op!r}")
                buf += chunk
                if len(buf) > MAX_LINE:
                    raise ProtectError(volume=self.volume, reason="reply too long")
        except TimeoutError as exc:
            raise ProtectError(volume=self.volume, reason=f"no answer to {op!r} within {self.timeout} s") from exc
        finally:
            sock.close()
        reply = json.loads(buf)
        if "error" in reply:
            raise decode_error(reply["error"])
        return reply["ok"]


def protected_volumes() -> list[dict[str, Any]]:
    """``volume.json`` of every protect daemon under the state root (with ``state`` added)."""
    root = state_root()
    out = []
    try:
        dirs = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return []
    for d in dirs:
        try:
            doc = json.loads((d / "volume.json").read_text())
        except (OSError, ValueError):
            continue
        doc["state"] = str(d)
        out.append(doc)
    return out


def find_protected(*names: str | None) -> dict[str, Any] | None:
    """The protected volume that any of ``names`` (volume name, source image or device, FUSE
    block file, loop device) refers to, or None."""
    wanted = {n for n in names if n}
    wanted |= {os.path.realpath(n) for n in list(wanted) if n.startswith("/")}
    for doc in protected_volumes():
        known = {doc.get("name"), doc.get("source"), doc.get("fuse"), doc.get("loop")} - {None}
        known |= {os.path.realpath(str(k)) for k in known if str(k).startswith("/")}
        if wanted & known:
            return doc
    return None
