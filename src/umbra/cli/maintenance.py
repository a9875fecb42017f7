"""``umbra check`` and ``umbra prune``."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer

from umbra.cli.common import JsonOption, RepoOption, emit_json, human_bytes, open_repository, stderr, stdout
from umbra.engine.jobs import load_job
from umbra.errors import EXIT_WARNING, CheckFailed, UsageError, VerifyFailed
from umbra.repo.check import check as repo_check
from umbra.repo.prune import prune as repo_prune
from umbra.repo.repair import RepairResult
from umbra.repo.repair import repair as repo_repair
from umbra.repo.retention import Policy, parse_duration


def check(
    repo: RepoOption = None,
    read_data: Annotated[bool, typer.Option(help="Read and verify every blob of every pack.")] = False,
    repair: Annotated[
        bool,
        typer.Option(help="Read every pack and rebuild the index from the blobs that verify (exclusive lock)."),
    ] = False,
    json_out: JsonOption = False,
) -> None:
    """Verify the repository's structure (and with --read-data, all data)."""
    repaired = None
    if repair:
        with open_repository(repo) as r, r.lock(exclusive=True):
            repaired = repo_repair(r)
        if not json_out:
            _print_repair(repaired)
    with open_repository(repo) as r, r.lock(exclusive=False):
        result = repo_check(r, read_data)
    if json_out:
        doc = {
            "ok": result.ok,
            "errors": result.errors,
            "warnings": result.warnings,
            "points": result.points,
            "journal_batches": result.journal_batches,
            "packs": result.packs,
            "blobs_verified": result.blobs,
            "bytes_read": result.bytes_read,
        }
        emit_json(doc if repaired is None else {**doc, "repair": asdict(repaired)})
    else:
        for w in result.warnings:
            stderr.print(f"warning: {w}")
        for e in result.errors:
            stderr.print(f"error: {e}")
        stdout.print(
            f"{result.points} points, {result.packs} packs"
            + (f", {result.journal_batches} journal batches" if result.journal_batches else "")
            + (f", {result.blobs} blobs verified ({human_bytes(result.bytes_read)} read)" if read_data else "")
            + (": no errors" if result.ok else f": {len(result.errors)} errors")
        )
    if not result.ok:
        raise CheckFailed(count=len(result.errors))
    if result.warnings:
        raise typer.Exit(EXIT_WARNING)


def _print_repair(done: RepairResult) -> None:
    for line in done.dropped:
        stderr.print(f"dropped: {line}")
    for pack_id in done.repacked:
        stderr.print(f"repacked: the good blobs of damaged pack {pack_id} (prune removes it)")
    for pid, missing in sorted(done.damaged_points.items()):
        what = "cannot be read (its manifest is damaged)" if missing < 0 else f"lacks {missing} blocks"
        stderr.print(f"damaged: point {pid} {what}")
    stdout.print(
        f"repair: {done.packs} packs read, {done.blobs_kept} blobs kept, {len(done.dropped)} dropped"
        + (
            "; back up the same sources again to store missing blocks (that heals every point needing them), "
            "or restore with --allow-damaged"
            if done.damaged_points
            else ""
        )
    )


def prune(
    repo: RepoOption = None,
    keep_last: Annotated[int, typer.Option(help="Keep the N newest points of each volume.")] = 0,
    keep_hourly: Annotated[int, typer.Option(help="Keep the newest point of each of N hours.")] = 0,
    keep_daily: Annotated[int, typer.Option(help="Keep the newest point of each of N days.")] = 0,
    keep_weekly: Annotated[int, typer.Option(help="Keep the newest point of each of N weeks.")] = 0,
    keep_monthly: Annotated[int, typer.Option(help="Keep the newest point of each of N months.")] = 0,
    keep_within: Annotated[
        str | None, typer.Option(help="Keep every point from this long before now on (e.g. 30d).")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Only show what would be removed.")] = False,
    volume: Annotated[list[str] | None, typer.Option("--volume", "-v", help="Apply to these volumes only.")] = None,
    job: Annotated[str | None, typer.Option(help="Use this job's retention and volumes (docs/JOBS.md).")] = None,
    jobs_file: Annotated[
        str | None, typer.Option(help="Jobs file (default $UMBRA_JOBS or /etc/umbra/jobs.toml).")
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """Remove points by a retention policy and free the space only they used."""
    within = parse_duration(keep_within) if keep_within else 0.0
    policy = Policy(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, within)
    if job:
        spec = load_job(job, jobs_file)
        if spec.retention is None:
            raise UsageError(f"job {job!r} has no [job.{job}.retention] table")
        policy, volume, repo = spec.retention, spec.backup.volumes, spec.repo or repo
    with open_repository(repo) as r, r.lock(exclusive=not dry_run):
        result = repo_prune(r, policy, dry_run, volumes=volume or None)
    if json_out:
        emit_json(
            {
                "dry_run": dry_run,
                "kept": [p.id for p in result.kept],
                "removed": [p.id for p in result.forgotten],
                "packs_deleted": result.packs_deleted,
                "packs_repacked": result.packs_repacked,
                "bytes_freed": result.bytes_freed,
            }
        )
        return
    verb = "would remove" if dry_run else "removed"
    for p in result.forgotten:
        stdout.print(f"{verb} {p.short_id} {p.volume} {p.time.astimezone():%Y-%m-%d %H:%M:%S} {p.type}")
    stdout.print(
        f"kept {len(result.kept)} points, {verb} {len(result.forgotten)}"
        + ("" if dry_run else f"; freed {human_bytes(result.bytes_freed)} ({result.packs_deleted} packs)")
    )


def verify(
    point: Annotated[str, typer.Argument(help="Point: id prefix, VOLUME@latest or VOLUME@TIME.")],
    repo: RepoOption = None,
    json_out: JsonOption = False,
) -> None:
    """Check that a point's filesystem is clean (its own fsck on a copy-on-write view); the result
    is kept with the point and shown by `umbra list`."""
    from umbra.engine.verify import verify as engine_verify

    with open_repository(repo) as r, r.lock(exclusive=False):
        result = engine_verify(r, point)
    if json_out:
        emit_json(result.to_dict())
    else:
        for step in result.steps:
            mark = "ok" if step["ok"] else f"FAILED (exit {step['exit_code']})"
            stdout.print(f"{step['command']}: {mark}", markup=False)
        verdict = "clean" if result.clean else "NOT clean"
        stdout.print(f"{point} ({result.filesystem}, point {result.point[:8]}): {verdict}", markup=False)
    if not result.clean:
        failed = result.steps[-1]
        raise VerifyFailed(ref=point, filesystem=result.filesystem, command=failed["command"], code=failed["exit_code"])
