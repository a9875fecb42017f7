"""What ``umbra protect`` does at start about its last run: a crash between journaling a write and
writing the volume is redone from the journal (RELIABILITY C4), and writes the journal cannot
account for (power loss, a run without the journal, a source changed while unprotected) are
recorded as a gap."""

from __future__ import annotations

import json
import os
import random
import re
import signal
from pathlib import Path

import pytest

from tests.frontends.protect_helpers import Protected
from tests.frontends.test_cdp import SIZE, Workload
from umbra.cow.journal import MARK, Journal


@pytest.fixture
def image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("UMBRA_STATE_DIR", str(tmp_path / "states"))
    path = tmp_path / "data.img"
    path.write_bytes(random.Random(3).randbytes(SIZE))
    return path


def _gap_reasons(state: Path) -> list[str]:
    journal = Journal.open(state / "journal", SIZE)
    try:
        return [r.mark["reason"] for r in journal.records() if r.kind == MARK and r.mark["kind"] == "gap"]
    finally:
        journal.close()


def test_a_write_journaled_but_not_written_is_redone_at_start(image: Path, tmp_path: Path) -> None:
    state = tmp_path / "states" / "data"
    d = Protected(image, "data", state)
    work = Workload(state / "nbd.sock", image.read_bytes(), seed=3)
    work.run(30)
    d.stop(signal.SIGKILL)
    # the dead daemon had journaled two more writes and died before writing them to the volume
    lost = [(12288, os.urandom(4096)), (SIZE - 70000, os.urandom(70000))]
    journal = Journal.open(state / "journal", SIZE)
    for offset, data in lost:
        journal.wait_written(journal.append_write(offset, data))
        work.model[offset : offset + len(data)] = data
    journal.close()
    assert image.read_bytes() != bytes(work.model)

    again = Protected(image, "data", state)
    try:
        status = again.client.call("journal")
        assert status["gap"] is None and status["gaps_recorded"] == 0  # same machine: nothing missing
        work.run(5)  # and it goes on from there
    finally:
        assert again.stop() == 0
    replayed = re.search(r"replayed (\d+) writes", (tmp_path / "states" / "protect-data.log").read_text())
    assert replayed is not None and int(replayed[1]) >= 2  # from the applied checkpoint (saved every second)
    assert image.read_bytes() == bytes(work.model)
    assert _gap_reasons(state) == []


def test_a_crash_of_the_machine_is_recorded_as_a_gap(image: Path, tmp_path: Path) -> None:
    state = tmp_path / "states" / "data"
    d = Protected(image, "data", state)
    work = Workload(state / "nbd.sock", image.read_bytes(), seed=4)
    work.run(10)
    d.stop(signal.SIGKILL)
    marker = json.loads((state / "running").read_text())
    (state / "running").write_text(json.dumps({**marker, "boot_id": "an-earlier-boot"}))
    Protected(image, "data", state).stop()
    assert image.read_bytes() == bytes(work.model)
    (reason,) = _gap_reasons(state)
    assert "power loss or kernel crash" in reason


def test_flushed_writes_lost_by_the_volume_in_a_machine_crash_come_back_from_the_journal(
    image: Path, tmp_path: Path
) -> None:
    """A flush makes the journal durable, the volume only at checkpoints.  After a machine crash
    (emulated: the image back at its bytes of the last checkpoint, the run's boot id another) the
    next start replays the journal, also when that start is a run without the journal."""
    state = tmp_path / "states" / "data"
    on_disk = image.read_bytes()  # no checkpoint during the run: nothing written since counts
    d = Protected(image, "data", state)
    work = Workload(state / "nbd.sock", on_disk, seed=7)
    work.run(20)  # ends with a flush
    d.stop(signal.SIGKILL)
    image.write_bytes(on_disk)
    marker = json.loads((state / "running").read_text())
    (state / "running").write_text(json.dumps({**marker, "boot_id": "an-earlier-boot"}))
    checkpoint = json.loads((state / "journal" / "checkpoint").read_bytes().rstrip(b"\0"))
    assert checkpoint["seq"] == 0, "the run's flushes synced the journal, not the volume"
    (state / "journal" / "checkpoint").write_text(json.dumps({**checkpoint, "boot_id": "an-earlier-boot"}))

    again = Protected(image, "data", state, "--no-journal")
    assert again.stop() == 0
    assert "replayed 20 writes" in (tmp_path / "states" / "protect-data.log").read_text()
    assert image.read_bytes() == bytes(work.model)


def test_runs_without_the_journal_and_changes_behind_its_back_are_gaps(image: Path, tmp_path: Path) -> None:
    state = tmp_path / "states" / "data"
    d = Protected(image, "data", state)
    Workload(state / "nbd.sock", image.read_bytes(), seed=5).run(5)
    assert d.stop() == 0
    d = Protected(image, "data", state, "--no-journal")
    Workload(state / "nbd.sock", image.read_bytes(), seed=6).run(5)
    assert d.stop() == 0
    d = Protected(image, "data", state)
    assert d.client.call("journal")["gaps_recorded"] == 1
    assert d.stop() == 0
    with open(image, "r+b") as f:  # nobody protects it now
        f.write(b"changed")
    d = Protected(image, "data", state)
    assert d.stop() == 0
    assert _gap_reasons(state) == [
        "the volume was served without this journal (--no-journal)",
        "the source was modified while it was not protected",
    ]
    d = Protected(image, "data", state)  # a clean restart of an unchanged source: no gap
    assert d.stop() == 0
    assert len(_gap_reasons(state)) == 2


def test_a_damaged_journal_stops_the_start_until_the_operator_cuts_it(image: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    state = tmp_path / "states" / "data"
    d = Protected(image, "data", state, "--journal-max", "100M")
    work = Workload(state / "nbd.sock", image.read_bytes(), seed=7)
    work.run(40)
    assert d.stop() == 0
    (segment,) = sorted((state / "journal").glob("seg-*"))
    data = bytearray(segment.read_bytes())
    data[len(data) // 3] ^= 0x10  # damage with valid records after it
    segment.write_bytes(bytes(data))
    cmd = [sys.executable, "-m", "umbra", "protect", str(image), "--name", "data", "--state", str(state)]
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 54 and "followed by valid records" in refused.stderr
    assert segment.read_bytes() == bytes(data), "nothing was cut"
    d = Protected(image, "data", state, "--journal-cut-damaged")
    try:
        assert d.client.call("journal")["gaps_recorded"] == 1
        work.run(5)
    finally:
        assert d.stop() == 0
    assert image.read_bytes() == bytes(work.model)  # the volume never depended on the journal
    (reason,) = _gap_reasons(state)
    assert "cut by --journal-cut-damaged" in reason
    (aside,) = (state / "journal").glob("damaged-*")
    assert (aside / segment.name).read_bytes() == bytes(data)
