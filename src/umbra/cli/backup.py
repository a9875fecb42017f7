"""``umbra backup``: one snapshot set of one or more sources, one point per source."""

from __future__ import annotations

from typing import Annotated

import typer

from umbra.cli.common import JsonOption, RepoOption, RichProgress, emit_json, human_bytes, open_repository, stdout
from umbra.coordinator.snapshot_set import SetOptions
from umbra.engine import backup_set
from umbra.engine.jobs import build_writers, load_job
from umbra.errors import UsageError
from umbra.writers.base import Writer


def backup(
    sources: Annotated[
        list[str] | None, typer.Argument(help="Image files, block devices or mount points (one snapshot set).")
    ] = None,
    volume: Annotated[list[str] | None, typer.Option("--volume", "-v", help="Volume name, once per source.")] = None,
    repo: RepoOption = None,
    job: Annotated[str | None, typer.Option(help="Run this job of the jobs file instead (docs/JOBS.md).")] = None,
    jobs_file: Annotated[
        str | None, typer.Option(help="Jobs file (default $UMBRA_JOBS or /etc/umbra/jobs.toml).")
    ] = None,
    type_: Annotated[str, typer.Option("--type", "-t", help="full, incremental or differential.")] = "full",
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Tag the points (repeatable).")] = None,
    all_blocks: Annotated[bool, typer.Option(help="Read every block, free space too.")] = False,
    pre_snapshot: Annotated[str | None, typer.Option(help="Command run before the snapshot; non-zero aborts.")] = None,
    post_snapshot: Annotated[str | None, typer.Option(help="Command run right after the snapshot.")] = None,
    post_backup: Annotated[str | None, typer.Option(help="Command run after the backup, with its status.")] = None,
    sqlite: Annotated[list[str] | None, typer.Option(help="SQLite database to make consistent (repeatable).")] = None,
    postgres: Annotated[
        list[str] | None, typer.Option(help="PostgreSQL server to checkpoint (libpq connection string; repeatable).")
    ] = None,
    provider: Annotated[list[str] | None, typer.Option(help="Provider(s) to use, in order of preference.")] = None,
    freeze_timeout: Annotated[float, typer.Option(help="Limit for writers to freeze, seconds.")] = 60.0,
    commit_timeout: Annotated[float, typer.Option(help="Limit for the snapshot commit, seconds.")] = 10.0,
    quiet_window: Annotated[
        float, typer.Option(help="Without writers: commit after this many seconds without writes (0: off).")
    ] = 0.0,
    quiet_timeout: Annotated[float, typer.Option(help="Longest wait for a quiet window, seconds.")] = 30.0,
    hold_limit: Annotated[
        float, typer.Option(help="--provider hold: longest the filesystem stays frozen for the read, seconds.")
    ] = 600.0,
    exclude_file: Annotated[
        list[str] | None, typer.Option(help="Leave this file's blocks out (swap, caches); restores as zeros.")
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """Back up volumes: snapshot them together (writers frozen, filesystems held), then store them."""
    if job:
        if sources:
            raise UsageError("give either SOURCES or --job, not both")
        spec = load_job(job, jobs_file)
        _run_and_report(spec.repo or repo, spec.backup, spec.writers(), json_out)
        return
    if not sources or not volume:
        raise UsageError("give SOURCES and one --volume per source (or --job NAME)")
    set_opts = SetOptions(
        freeze_timeout=freeze_timeout,
        commit_timeout=commit_timeout,
        providers=provider or [],
        exclude_files=exclude_file or [],
        quiet_window=quiet_window,
        quiet_timeout=quiet_timeout,
        hold_limit=hold_limit,
    )
    opts = backup_set.SetBackupOptions(sources, volume, type_, tag or [], all_blocks, set_opts)
    _run_and_report(repo, opts, build_writers(pre_snapshot, post_snapshot, post_backup, sqlite, postgres), json_out)


def _run_and_report(repo: str | None, opts: backup_set.SetBackupOptions, writers: list[Writer], json_out: bool) -> None:
    with open_repository(repo) as r:
        results = backup_set.run(r, opts, writers, RichProgress(not json_out))
    if json_out:
        first = results[0].point
        emit_json(
            {
                "set_id": first.set_id,
                "consistency": first.consistency,
                "phases": first.phases,
                "results": [{"point": res.point.to_dict(), "stats": res.stats} for res in results],
            }
        )
        return
    for res in results:
        p, s = res.point, res.stats
        stdout.print(
            f"point {p.id[:8]} of {p.volume} ({p.type}, {p.consistency} via {p.provider}) "
            f"at {p.time.astimezone():%Y-%m-%d %H:%M:%S}"
        )
        stdout.print(
            f"  scanned {human_bytes(s['bytes_scanned'])}, read {human_bytes(s['bytes_read'])}, "
            f"new {human_bytes(s['bytes_new'])}, stored {human_bytes(s['bytes_stored'])} in {s['duration_s']:.2f} s"
        )
