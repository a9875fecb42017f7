"""``umbra protect`` (the daemon) and the commands that talk to it: ``status``, ``snapshot``, ``journal``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from umbra.cli.common import JsonOption, backend_for, emit_json, human_bytes, parse_size, passphrase, stdout
from umbra.frontends.control import ControlClient, state_dir_for
from umbra.repo.repository import Repository

StateOption = Annotated[
    str | None,
    typer.Option(
        "--state", help="The volume's state directory (default: UMBRA_STATE_DIR or /var/lib/umbra/protect, /NAME)."
    ),
]


def protect(
    source: Annotated[str, typer.Argument(help="Image file or block device to protect (held exclusively).")],
    name: Annotated[str, typer.Option("--name", help="Volume name: NBD export, FUSE file and control name.")],
    nbd: Annotated[
        list[str] | None, typer.Option("--nbd", help="Also serve NBD at HOST:PORT or unix:PATH (repeatable).")
    ] = None,
    fuse: Annotated[
        str | None, typer.Option("--fuse", help="Mount FUSE block files NAME.img, NAME@SNAP.img here.")
    ] = None,
    loop: Annotated[bool, typer.Option("--loop", help="Loop-attach the FUSE block file; mount that device.")] = False,
    state: StateOption = None,
    sync: Annotated[bool, typer.Option("--sync", help="Every write durable before it is acknowledged.")] = False,
    chunk_size: Annotated[str, typer.Option(help="Copy-on-write and tracking granularity.")] = "64K",
    memory: Annotated[
        str, typer.Option(help="Difference store memory before spilling to the state directory.")
    ] = "256M",
    store_limit: Annotated[
        str | None, typer.Option(help="Difference store limit; past it a snapshot fails, never a write.")
    ] = None,
    journal_max: Annotated[str | None, typer.Option(help="Drop the oldest journal segments past this size.")] = None,
    journal_min_free: Annotated[
        str,
        typer.Option(
            help="Keep this much free on the journal's filesystem: the oldest segments (shipped ones with --repo) "
            "are dropped first; if that is not enough the journal pauses (a recorded gap), never the writes."
        ),
    ] = "256M",
    journal_cut_damaged: Annotated[
        bool,
        typer.Option(
            "--journal-cut-damaged",
            help="Start even if the journal is damaged in the middle: keep the records before the damage, move the "
            "rest aside (STATE/journal/damaged-*) and record a gap.",
        ),
    ] = False,
    no_journal: Annotated[bool, typer.Option("--no-journal", help="Do not keep a CDP journal.")] = False,
    journal_direct: Annotated[
        bool,
        typer.Option(
            "--journal-direct/--journal-buffered",
            help="Journal batches of large writes with O_DIRECT, outside the engine's lock (default); "
            "--journal-buffered writes every record through the page cache under it.",
        ),
    ] = True,
    repo: Annotated[
        str | None,
        typer.Option("--repo", "-r", help="Ship the CDP journal into this repository continuously (VOLUME@TIME)."),
    ] = None,
    ship_interval: Annotated[
        float, typer.Option(help="With --repo: seconds between journal batches (lag against batch count).")
    ] = 0.25,
    json_out: JsonOption = False,
) -> None:
    """Serve SOURCE as protected volume NAME until SIGTERM: every write passes through umbra."""
    from umbra.frontends.daemon import ProtectOptions, run_daemon

    if loop and not fuse:
        fuse = str(state_dir_for(name, state) / "fuse")
    opts = ProtectOptions(
        source=source,
        name=name,
        state_dir=state_dir_for(name, state),
        nbd=list(nbd or []),
        fuse_dir=Path(fuse) if fuse else None,
        loop=loop,
        sync=sync,
        chunk_size=parse_size(chunk_size),
        memory_limit=parse_size(memory),
        store_limit=parse_size(store_limit) if store_limit else None,
        journal=not no_journal,
        journal_max=parse_size(journal_max) if journal_max else None,
        journal_min_free=parse_size(journal_min_free),
        journal_cut_damaged=journal_cut_damaged,
        journal_direct=journal_direct,
        repo=Repository.open(backend_for(repo), passphrase) if repo else None,
        ship_interval=ship_interval,
    )

    def ready(doc: dict[str, Any]) -> None:
        if json_out:
            emit_json(doc)
        else:
            where = [f"nbd {a}" for a in doc["nbd"]]
            if doc["fuse"]:
                where.append(f"fuse {doc['fuse']}")
            if doc["loop"]:
                where.append(f"loop device {doc['loop']} (mount this, not {source})")
            print(f"umbra: protecting {name} ({human_bytes(doc['size'])}) from {source}: " + "; ".join(where))
        sys.stdout.flush()

    run_daemon(opts, ready)


def status(
    volume: Annotated[str, typer.Argument(help="Protected volume name.")],
    state: StateOption = None,
    json_out: JsonOption = False,
) -> None:
    """Show a protected volume: front ends, writes, snapshots, tracking, difference store, journal."""
    doc = ControlClient(volume, state_dir_for(volume, state)).call("status")
    if json_out:
        emit_json(doc)
        return
    stdout.print(
        f"{doc['volume']}: {human_bytes(doc['size'])} from {doc['source']} (pid {doc['pid']}, since {doc['started']})"
    )
    stdout.print(
        f"  served: {', '.join(doc['nbd'])}"
        + (f"; fuse {doc['fuse']}" if doc["fuse"] else "")
        + (f"; loop {doc['loop']}" if doc["loop"] else "")
    )
    stdout.print(f"  writes: {doc['writes']} ({human_bytes(doc['bytes_written'])}){'; sync' if doc['sync'] else ''}")
    tracking = doc["tracking"]
    stdout.print(
        f"  tracking: {len(tracking['generations'])} generations"
        + (f" (reset: {tracking['invalidated']})" if tracking["invalidated"] else "")
    )
    store = doc["difference_store"]
    stdout.print(
        f"  difference store: {store['copies']} copies, {human_bytes(store['memory_bytes'])} in memory, "
        f"{human_bytes(store['spilled_bytes'])} spilled, limit {human_bytes(store['limit'])}"
    )
    _print_snapshots(doc["snapshots"])
    if doc["journal"]:
        _print_journal(doc["journal"])


def _print_snapshots(snaps: list[dict[str, Any]]) -> None:
    if not snaps:
        stdout.print("  no snapshots")
        return
    table = Table("snapshot", "created", "protected", "copied", "state")
    for s in snaps:
        table.add_row(
            s["name"],
            s["created"],
            human_bytes(s["protected_bytes"]),
            human_bytes(s["copied_bytes"]),
            f"FAILED: {s['failed']}" if s["failed"] else "ok",
        )
    stdout.print(table)


def _print_journal(j: dict[str, Any]) -> None:
    rate = f"{human_bytes(j['write_rate'])}/s" if j["write_rate"] else "-"
    stdout.print(
        f"  journal: {j['records']} records in {j['segments']} segments, {human_bytes(j['bytes'])}; "
        f"{j['first'] or '-'} .. {j['last'] or '-'}; write rate {rate}"
    )
    gap = j.get("gap")
    if gap:
        stdout.print(
            f"  JOURNAL GAP since {gap['since']}: {gap['reason']}; writes go on unjournaled, retrying "
            "(VOLUME@TIME cannot name instants from then until a point taken after it writes again)"
        )
    elif j.get("gaps_recorded"):
        stdout.print(f"  journal gaps recorded since start: {j['gaps_recorded']} (see the log)")
    if j.get("over_limit"):
        stdout.print(
            "  WARNING: the journal is over --journal-max: records not shipped yet are kept until the repository "
            "takes them (shipping paused?); the history configured cannot be kept in that space"
        )
    ship = j.get("shipping")
    if ship:
        state = f"PAUSED ({ship['last_error']})" if ship["last_error"] else "ok"
        stdout.print(
            f"  shipping: {state}; shipped through record {ship['shipped_seq']}, {ship['pending_records']} pending, "
            f"lag {ship['lag_s']:.3f} s; {ship['batches']} batches, {human_bytes(ship['bytes_shipped'])}"
        )


snapshot_app = typer.Typer(help="Snapshots of a protected volume.", no_args_is_help=True)


@snapshot_app.command("create")
def snapshot_create(volume: str, name: str, state: StateOption = None, json_out: JsonOption = False) -> None:
    """Take a crash-consistent snapshot NAME of VOLUME now (use `umbra backup` for a coordinated one)."""
    doc = ControlClient(volume, state_dir_for(volume, state)).call("snapshot-create", name=name)
    if json_out:
        emit_json(doc)
    else:
        stdout.print(
            f"snapshot {doc['export']} taken at {doc['created']}; NBD {doc['nbd']}"
            + (f"; file {doc['fuse']}" if doc["fuse"] else "")
        )


@snapshot_app.command("list")
def snapshot_list(volume: str, state: StateOption = None, json_out: JsonOption = False) -> None:
    """List VOLUME's snapshots with what each still protects."""
    snaps = ControlClient(volume, state_dir_for(volume, state)).call("snapshot-list")
    if json_out:
        emit_json(snaps)
    else:
        _print_snapshots(snaps)


@snapshot_app.command("delete")
def snapshot_delete(volume: str, name: str, state: StateOption = None) -> None:
    """Delete snapshot NAME of VOLUME and free its copies."""
    ControlClient(volume, state_dir_for(volume, state)).call("snapshot-delete", name=name)
    stdout.print(f"snapshot {volume}@{name} deleted")


def journal(
    volume: Annotated[str, typer.Argument(help="Protected volume name.")],
    state: StateOption = None,
    json_out: JsonOption = False,
) -> None:
    """Show the CDP journal of a protected volume: time range, size, write rate."""
    doc = ControlClient(volume, state_dir_for(volume, state)).call("journal")
    if json_out:
        emit_json(doc)
    elif doc is None:
        stdout.print(f"{volume} keeps no journal (--no-journal)")
    else:
        _print_journal(doc)
