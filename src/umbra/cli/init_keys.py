"""``umbra init`` and ``umbra key add|list|remove|passwd``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from umbra.cli.common import (
    JsonOption,
    RepoOption,
    backend_for,
    emit_json,
    new_passphrase,
    open_repository,
    parse_size,
    passphrase,
    require_repo,
    stdout,
)
from umbra.errors import PassphraseMissing
from umbra.repo.format import DEFAULT_FANOUT
from umbra.repo.repository import Repository


def init(
    repo: RepoOption = None,
    encryption: Annotated[
        str, typer.Option(help="aes-256-gcm, or none for tests and trusted storage.")
    ] = "aes-256-gcm",
    block_size: Annotated[str, typer.Option(help="Block size of volume images (power of two, 4K-4M).")] = "64K",
    fanout: Annotated[int, typer.Option(help="Entries per volume-tree node.")] = DEFAULT_FANOUT,
    pack_size: Annotated[str, typer.Option(help="Target size of pack files.")] = "16M",
    json_out: JsonOption = False,
) -> None:
    """Create a new repository."""
    secret = None
    if encryption != "none":
        secret = passphrase()
        if not secret:
            raise PassphraseMissing()
    r = Repository.init(
        backend_for(require_repo(repo)), secret, encryption, parse_size(block_size), fanout, parse_size(pack_size)
    )
    if json_out:
        emit_json({"id": r.config.id, "location": r.backend.location, "encryption": r.config.encryption})
    else:
        stdout.print(f"created repository {r.config.id[:8]} at {r.backend.location} ({r.config.encryption})")


key_app = typer.Typer(help="Manage the passphrase-wrapped keys of a repository.", no_args_is_help=True)


@key_app.command("add")
def key_add(
    repo: RepoOption = None,
    label: Annotated[str, typer.Option(help="A note stored with the key.")] = "",
) -> None:
    """Add a key: the same master key wrapped by another passphrase (UMBRA_NEW_PASSWORD)."""
    with open_repository(repo) as r:
        key_id = r.add_key(new_passphrase(), label)
    stdout.print(f"added key {key_id}")


@key_app.command("list")
def key_list(repo: RepoOption = None, json_out: JsonOption = False) -> None:
    """List the keys."""
    with open_repository(repo) as r:
        keys = r.list_keys()
    if json_out:
        emit_json(keys)
        return
    table = Table("id", "created", "host", "kdf", "label", "")
    for k in keys:
        table.add_row(k["id"], k["created"][:19], k["host"], k["kdf"], k["label"], "current" if k["current"] else "")
    stdout.print(table)


@key_app.command("remove")
def key_remove(key_id: str, repo: RepoOption = None) -> None:
    """Remove a key (never the last one)."""
    with open_repository(repo) as r:
        r.remove_key(key_id)
    stdout.print(f"removed key {key_id}")


@key_app.command("passwd")
def key_passwd(repo: RepoOption = None) -> None:
    """Change the passphrase of the key in use (new one from UMBRA_NEW_PASSWORD)."""
    with open_repository(repo) as r:
        new_id = r.change_passphrase(new_passphrase())
    stdout.print(f"passphrase changed (key {new_id})")
