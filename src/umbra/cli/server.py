"""``umbra serve`` (the network backup server) and ``umbra token`` (its access tokens)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from umbra.cli.common import JsonOption, emit_json, parse_size, stderr, stdout
from umbra.errors import UsageError
from umbra.server.tokens import TokenStore, tokens_path

RootOption = Annotated[
    Path, typer.Option("--root", help="The server's directory: repos/ holds the repositories, tokens.json the tokens.")
]


def serve(
    root: RootOption,
    listen: Annotated[str, typer.Option(help="HOST:PORT to listen on (port 0: any free one).")] = "127.0.0.1:8473",
    tls_cert: Annotated[str | None, typer.Option(help="TLS certificate chain (PEM); with --tls-key.")] = None,
    tls_key: Annotated[str | None, typer.Option(help="TLS private key (PEM).")] = None,
    quota: Annotated[
        str | None, typer.Option(help="At most this much in each repository (e.g. 500G); a fuller one refuses writes.")
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """Keep repositories for backup clients over HTTP(S) until SIGTERM or Ctrl-C.  Clients use
    --repo http(s)://HOST:PORT/NAME with a token from `umbra token add` (UMBRA_TOKEN)."""
    from umbra.server.run import serve as run_server  # (aiohttp only when serving)

    if (tls_cert is None) != (tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    store = TokenStore(tokens_path(root))

    def ready(url: str) -> None:
        count = len(store.tokens())
        if json_out:
            emit_json({"url": url, "root": str(root), "tokens": count})
        else:
            stderr.print(
                f"umbra: serving the repositories in {root / 'repos'} at {url} ({count} tokens)", soft_wrap=True
            )
        if count == 0:
            stderr.print(f"umbra: no tokens yet: `umbra token add --root {root} --repo NAME` makes one")

    limit = parse_size(quota) if quota else None
    run_server(root, listen, (tls_cert, tls_key) if tls_cert and tls_key else None, ready, limit)


token_app = typer.Typer(help="Access tokens of the backup server (`umbra serve`).", no_args_is_help=True)


@token_app.command("add")
def token_add(
    root: RootOption,
    repo: Annotated[str, typer.Option(help="The repository the token opens (a name under ROOT/repos).")] = "",
    append_only: Annotated[
        bool, typer.Option("--append-only", help="Back up only: read and add objects, never delete or replace.")
    ] = False,
    admin: Annotated[bool, typer.Option("--admin", help="For the web UI and statistics: opens no repository.")] = False,
    label: Annotated[str, typer.Option(help="A note: the client it is for.")] = "",
    json_out: JsonOption = False,
) -> None:
    """Make a token; it is shown once (the server keeps only its hash)."""
    if admin == bool(repo) or (admin and append_only):
        raise UsageError("give --repo NAME (with --append-only or not), or --admin")
    role = "admin" if admin else "append" if append_only else "full"
    entry, token = TokenStore(tokens_path(root)).add(repo, role, label)
    if json_out:
        emit_json({"id": entry.id, "repo": entry.repo, "role": entry.role, "token": token})
        return
    opens = "the web UI" if entry.role == "admin" else f"repository {entry.repo!r} ({entry.role})"
    stderr.print(f"token {entry.id} opens {opens}; it is shown only now:")
    stdout.print(token, soft_wrap=True)


@token_app.command("list")
def token_list(root: RootOption, json_out: JsonOption = False) -> None:
    """The tokens (never their secrets)."""
    tokens = TokenStore(tokens_path(root)).tokens()
    docs = [
        {"id": t.id, "repo": t.repo, "role": t.role, "created": t.created, "label": t.label} for t in tokens.values()
    ]
    if json_out:
        emit_json(docs)
        return
    for d in docs:
        stdout.print(f"{d['id']}  {d['repo']:20} {d['role']:7} {d['created']}  {d['label']}")
    if not docs:
        stderr.print("no tokens")


@token_app.command("revoke")
def token_revoke(root: RootOption, token_id: Annotated[str, typer.Argument(help="The token's id.")]) -> None:
    """Revoke a token: the server refuses it from its next request on."""
    entry = TokenStore(tokens_path(root)).revoke(token_id)
    stderr.print(f"token {entry.id} of repository {entry.repo!r} revoked")
