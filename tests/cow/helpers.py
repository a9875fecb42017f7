from __future__ import annotations

from pathlib import Path

from umbra.cow.engine import CowVolume, WriteLog
from umbra.cow.store import DifferenceStore
from umbra.cow.tracking import ChangeTracker
from umbra.volume.backing import open_backing


def make_volume(
    tmp_path: Path,
    size: int,
    chunk: int = 4096,
    memory_limit: int = 1 << 20,
    limit: int = 1 << 30,
    content: bytes | None = None,
    tracking: bool = True,
    journal: WriteLog | None = None,
    **engine: float,
) -> CowVolume:
    image = tmp_path / "vol.img"
    if content is None:
        image.write_bytes(b"")
        with open(image, "r+b") as f:
            f.truncate(size)
    else:
        image.write_bytes(content)
    spill = tmp_path / "state"
    spill.mkdir(exist_ok=True)
    store = DifferenceStore(chunk, spill, memory_limit=memory_limit, limit=limit)
    tracker = ChangeTracker(-(-size // chunk)) if tracking else None
    return CowVolume(open_backing(str(image)), store, chunk, tracker=tracker, journal=journal, name="v", **engine)  # type: ignore[arg-type]
