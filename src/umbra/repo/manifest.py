"""Points (recovery points): one sealed JSON manifest per point, written last and atomically.

A point's id is random (32 hex digits); its manifest lives at ``points/<id>`` and is sealed with the
id as associated data, so a manifest cannot be renamed into another point.
"""

from __future__ import annotations

import json
import os
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from umbra.errors import IntegrityError, UnsupportedFormat
from umbra.repo.crypto import Crypto
from umbra.repo.format import AAD_MANIFEST, FORMAT_VERSION
from umbra.repo.pointref import to_ns

VOLUME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
BACKUP_TYPES = ("full", "incremental", "differential")


def new_point_id() -> str:
    return os.urandom(16).hex()


@dataclass
class Point:
    """Everything a recovery point records; ``root``/``height`` locate its volume tree."""

    id: str
    volume: str
    time: datetime
    type: str
    size: int
    block_size: int
    fanout: int
    root: str
    height: int
    parent: str | None = None
    base: str | None = None
    tags: list[str] = field(default_factory=list)
    host: str = ""
    source: str = ""
    used_map: str = "all"
    content: str = "image"  # "image": a block volume; "btrfs-send": a subvolume's send stream
    stats: dict[str, Any] = field(default_factory=dict)
    umbra_version: str = ""
    # written by snapshot-set backups (absent from points of a plain backup of an image):
    set_id: str | None = None
    consistency: str = ""
    provider: str = ""
    phases: list[dict[str, Any]] = field(default_factory=list)
    writers: list[dict[str, Any]] = field(default_factory=list)
    components: dict[str, Any] = field(default_factory=dict)  # the backup components document
    # protected volumes: {"generation": id} of the snapshot this point was read from
    tracking: dict[str, Any] = field(default_factory=dict)
    # protected volumes with a CDP journal: {"journal": id, "seq": n, "time_ns": t} of the snapshot's
    # mark, so that journal records after it can be applied (VOLUME@TIME)
    cdp: dict[str, Any] = field(default_factory=dict)

    @property
    def nblocks(self) -> int:
        return -(-self.size // self.block_size)

    @property
    def state_time_ns(self) -> int:
        """The instant the point's data is from: its snapshot's journal mark where it has one
        (the backup itself starts a little later), else the point's time."""
        if self.cdp.get("time_ns"):
            return int(self.cdp["time_ns"])
        return to_ns(self.time)

    @property
    def short_id(self) -> str:
        return self.id[:8]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["time"] = self.time.astimezone(UTC).isoformat(timespec="microseconds")
        d["format"] = FORMAT_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Point:
        """Raises ``ValueError`` (or ``TypeError``, ``KeyError``) for anything but a well-typed
        manifest: a stored manifest is input like any other."""
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        if d.get("format") != FORMAT_VERSION:
            raise UnsupportedFormat(f"point {d.get('id')} has format {d.get('format')}", supported=FORMAT_VERSION)
        d = {k: v for k, v in d.items() if k != "format"}
        d["time"] = datetime.fromisoformat(d["time"])
        _check_fields(d)
        if d["size"] < 0 or d["block_size"] <= 0 or d["fanout"] < 2 or d["height"] < 0:
            raise ValueError("sizes out of range")
        if not re.fullmatch(r"[0-9a-f]{64}", d["root"]):
            raise ValueError("bad root id")
        return cls(**d)


def _check_fields(d: dict[str, Any]) -> None:
    """Every field present has its annotated type (ints are not bools; list items are checked);
    missing required fields and unknown ones are left to the constructor (TypeError)."""
    for name, hint in _FIELD_TYPES.items():
        if name not in d:
            continue
        value = d[name]
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        kinds = tuple(typing.get_origin(h) or h for h in options)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ValueError(f"field {name} has type {type(value).__name__}")
        if isinstance(value, list):
            (item,) = typing.get_args(hint)
            if not all(isinstance(x, typing.get_origin(item) or item) for x in value):
                raise ValueError(f"field {name} holds an item of another type")


_FIELD_TYPES = typing.get_type_hints(Point)


def seal_point(crypto: Crypto, point: Point) -> bytes:
    body = json.dumps(point.to_dict(), sort_keys=True).encode()
    return crypto.seal(body, AAD_MANIFEST + point.id.encode())


def open_point(crypto: Crypto, point_id: str, data: bytes) -> Point:
    what = f"manifest of point {point_id}"
    body = crypto.open(data, AAD_MANIFEST + point_id.encode(), what)
    try:
        point = Point.from_dict(json.loads(body))
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise IntegrityError(f"{what}: malformed ({exc})") from None
    if point.id != point_id:
        raise IntegrityError(f"{what}: names another point")
    return point
