"""The backup server against real clients: tenants cannot reach each other (RELIABILITY F1, F2),
append-only tokens cannot destroy (F3), revoked tokens stop at once and guessing is throttled (F4),
and the CLI backs up and restores through it, over TLS too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from tests.server.helpers import MiB, ServerProcess, alice_with_a_point, cli_env, umbra, volume
from umbra.repo.backends.http import HttpBackend
from umbra.repo.manifest import seal_point
from umbra.repo.repository import Repository
from umbra.server.app import Server
from umbra.server.tokens import TokenStore
from umbra.testing.tls import self_signed


@pytest.fixture
def server(tmp_path: Path):  # type: ignore[no-untyped-def]
    proc = ServerProcess(tmp_path / "srv")
    yield proc
    assert proc.stop() == 0


def route_table() -> list[tuple[str, str]]:
    """(method, path template) of every route the server has."""
    app = Server(Path("/nonexistent"), TokenStore(Path("/nonexistent/tokens.json"))).app()
    out = []
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        out.append((route.method, info.get("formatter") or info.get("path", "")))
    return out


def test_tenants_cannot_reach_each_other(server: ServerProcess, tmp_path: Path) -> None:
    """F1: every route and method with bob's token on alice's repository, and names that try to
    slip past the check; F2: no answer tells bob whether alice stores a blob."""
    alice, _ = alice_with_a_point(server, tmp_path)
    repo = server.root / "repos" / "alice"
    names = [p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()]
    secrets = [(repo / n).read_bytes() for n in names]
    bob = server.token("bob")
    bob_url = server.repo_url("bob")
    assert umbra(cli_env(bob), "init", "--repo", bob_url).returncode == 0
    routes = route_table()
    assert {m for m, _ in routes} >= {"GET", "HEAD", "POST", "PUT", "DELETE"}
    targets = ["alice", "alice1", "ALICE", "..%2falice", "%2e%2e", "bob%2f..%2falice", "bob/..%2f..%2falice"]
    answers, pages = [], []
    for method, template in routes:
        if (method, template) == ("POST", "/ui/login"):
            continue  # logging in is the web UI test's (here it would only count failed logins)
        for target in targets:
            for name in [*names[:3], "..%2f..%2ftokens.json", "config"]:
                path = template.replace("{repo}", target).replace("{name}", name).replace("{directory}", "data")
                path = path.replace("{token_id}", bob.split("_")[1])
                answer = server.request(method, path, bob, body=b"x" if method in ("PUT", "POST") else None)
                if path == "/v1/health":  # open to all, and says only this
                    assert answer.status == 405 or answer.data in (b"", b'{"ok": true}'), answer.data
                    continue
                (answers if path.startswith("/v1/") else pages).append(answer)
    for method, path in [("GET", "/v1/repos/bob/objects/..%2f..%2falice%2fconfig"), ("GET", "/v1/repos/bob/../alice")]:
        answers.append(server.request(method, path, bob))
    statuses = {r.status for r in answers}
    assert statuses <= {401, 403, 404, 405}, statuses
    # the web UI takes no bearer token: without a session it offers its login page and stylesheet only
    assert {r.status for r in pages} <= {200, 303, 405}
    assert all(r.status != 200 or not r.data or b"Admin token" in r.data or b"font-family" in r.data for r in pages)
    assert not any(secret and secret in r.data for r in [*answers, *pages] for secret in secrets)
    # F2: bob asks for alice's blobs by name in his own repository: the same answer as for any name
    pack = next(n for n in names if n.startswith("data/"))
    assert server.request("GET", f"/v1/repos/bob/objects/{pack}", bob).status == 404
    assert server.request("HEAD", f"/v1/repos/bob/objects/{pack}", bob).status == 404
    # alice is untouched and still hers
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()) == sorted(names)
    assert server.request("GET", "/v1/repos/alice/objects/config", alice).status == 200


def test_an_append_only_token_backs_up_but_destroys_nothing(server: ServerProcess, tmp_path: Path) -> None:
    """F3: backups (with their locks) work; delete, replace, prune and breaking a lock do not."""
    full, source = alice_with_a_point(server, tmp_path)
    append = server.token("alice", append_only=True)
    url = server.repo_url("alice")
    env = cli_env(append)
    volume(source, seed=2)
    done = umbra(env, "backup", str(source), "--volume", "vol", "--repo", url)
    assert done.returncode == 0, done.stderr  # its own lock: created, refreshed, removed
    listed = umbra(env, "list", "--repo", url, "--json")
    assert listed.returncode == 0 and listed.stdout.count('"id"') == 2
    pruned = umbra(env, "prune", "--keep-last", "1", "--repo", url)
    assert pruned.returncode == 28, pruned.stderr
    assert "refused access" in pruned.stderr and "may not" in pruned.stderr
    assert umbra(env, "list", "--repo", url, "--json").stdout.count('"id"') == 2  # nothing went
    point = next(p for p in (server.root / "repos" / "alice" / "points").iterdir())
    name = f"points/{point.name}"
    assert server.request("DELETE", f"/v1/repos/alice/objects/{name}", append).status == 403
    assert server.request("PUT", f"/v1/repos/alice/objects/{name}?replace=1", append, body=b"forged").status == 403
    assert server.request("PUT", f"/v1/repos/alice/objects/{name}", append, body=b"forged").status == 409
    assert server.request("PUT", "/v1/repos/alice/objects/config?replace=1", append, body=b"{}").status == 403
    assert server.request("POST", "/v1/repos/alice/temporaries", append).status == 403
    lock = "locks/" + "ab" * 16
    assert server.request("PUT", f"/v1/repos/alice/objects/{lock}", full, body=b"{}").status == 201
    assert server.request("DELETE", f"/v1/repos/alice/objects/{lock}", append).status == 403  # another's lock
    assert server.request("DELETE", f"/v1/repos/alice/objects/{lock}", full).status == 204
    assert point.read_bytes() != b"forged"
    assert umbra(cli_env(full), "check", "--repo", url).returncode == 0


def test_a_revoked_token_stops_within_a_second_and_leaves_no_point(server: ServerProcess, tmp_path: Path) -> None:
    """F4: revoked during a backup, the next request fails; no point is committed."""
    token, _ = alice_with_a_point(server, tmp_path)
    url = server.repo_url("alice")
    big = volume(tmp_path / "big.img", seed=3, size=256 * MiB)
    with open(big, "r+b") as f:  # every block different: the upload takes a while
        for i in range(0, 256 * MiB, 64 * 1024):
            f.seek(i)
            f.write(os.urandom(4096))
    backup = subprocess.Popen(
        [sys.executable, "-m", "umbra", "backup", str(big), "--volume", "big", "--repo", url],
        env=cli_env(token),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    packs = server.root / "repos" / "alice" / "data"
    before = sum(1 for _ in packs.rglob("*"))
    deadline = time.monotonic() + 60
    while sum(1 for _ in packs.rglob("*")) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # uploading
    server.revoke(token)
    revoked = time.monotonic()
    assert server.request("GET", "/v1/repos/alice", token).status == 401
    assert time.monotonic() - revoked < 1
    _, err = backup.communicate(timeout=120)
    assert backup.returncode == 28, err
    assert "token is not valid" in err
    points = list((server.root / "repos" / "alice" / "points").iterdir())
    assert len(points) == 1  # only the point from before


def test_guessing_tokens_is_throttled(server: ServerProcess, tmp_path: Path) -> None:
    """F4: at most a handful of wrong tokens a second from one address; then even a right one
    waits, so guessing learns nothing."""
    good = server.token("alice")
    statuses = [server.request("GET", "/v1/repos/alice", f"umbra_{i:016x}_{'A' * 43}").status for i in range(30)]
    assert statuses.count(401) <= 8 and statuses.count(429) >= 20
    assert server.request("GET", "/v1/repos/alice", good).status == 429
    time.sleep(3)
    assert server.request("GET", "/v1/repos/alice", good).status == 200


def test_concurrent_clients_back_up_and_restore(server: ServerProcess, tmp_path: Path) -> None:
    """I1 (small): clients back up at once, each into its repository, and restore what they wrote."""
    results: dict[str, str] = {}

    def client(n: int) -> None:
        name = f"client{n}"
        env = cli_env(server.token(name))
        url = server.repo_url(name)
        source = volume(tmp_path / f"{name}.img", seed=n)
        steps = [
            ["init", "--repo", url],
            ["backup", str(source), "--volume", "v", "--repo", url],
            ["restore", "v@latest", str(tmp_path / f"{name}.out"), "--repo", url],
        ]
        for step in steps:
            done = umbra(env, *step)
            if done.returncode != 0:
                results[name] = done.stderr
                return
        same = (tmp_path / f"{name}.out").read_bytes() == source.read_bytes()
        results[name] = "ok" if same else "restored bytes differ"

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results == {f"client{n}": "ok" for n in range(4)}


def test_tls_with_the_servers_certificate_authority(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    server = ServerProcess(tmp_path / "srv", "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        assert server.url.startswith("https://")
        url = server.repo_url("alice")
        token = server.token("alice")
        untrusted = umbra(cli_env(token), "init", "--repo", url)
        assert untrusted.returncode == 20 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr
        env = cli_env(token, UMBRA_CA_FILE=str(cert))
        assert umbra(env, "init", "--repo", url).returncode == 0
        source = volume(tmp_path / "v.img", seed=5)
        assert umbra(env, "backup", str(source), "--volume", "v", "--repo", url).returncode == 0
        assert umbra(env, "restore", "v@latest", str(tmp_path / "out.img"), "--repo", url).returncode == 0
        assert (tmp_path / "out.img").read_bytes() == source.read_bytes()
    finally:
        server.stop()


def test_wrong_addresses_and_tokens_are_one_clear_line(server: ServerProcess, tmp_path: Path) -> None:
    token = server.token("alice")
    cases = [
        (cli_env(token), server.repo_url("bob"), "no such repository for this token"),
        (cli_env("umbra_0000000000000000_" + "A" * 43), server.repo_url("alice"), "token is not valid"),
        (dict(os.environ, UMBRA_PASSWORD="secret"), server.repo_url("alice"), "no token"),
    ]
    for env, url, message in cases:
        done = umbra(env, "init", "--repo", url)
        assert done.returncode == 28 and message in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_tokens_are_managed_from_the_command_line(tmp_path: Path) -> None:
    root = tmp_path / "srv"
    env = dict(os.environ)
    added = umbra(env, "token", "add", "--root", str(root), "--repo", "web1", "--append-only", "--label", "web1 host")
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    assert token.startswith("umbra_") and "shown only now" in added.stderr
    admin = umbra(env, "token", "add", "--root", str(root), "--admin", "--json")
    assert json.loads(admin.stdout)["role"] == "admin"
    listed = json.loads(umbra(env, "token", "list", "--root", str(root), "--json").stdout)
    assert sorted((t["repo"], t["role"], t["label"]) for t in listed) == [
        ("*", "admin", ""),
        ("web1", "append", "web1 host"),
    ]
    assert token.split("_")[2] not in (root / "tokens.json").read_text()  # only its hash is kept
    assert oct((root / "tokens.json").stat().st_mode & 0o777) == "0o600"
    revoked = umbra(env, "token", "revoke", "--root", str(root), token.split("_")[1])
    assert revoked.returncode == 0
    assert [t["role"] for t in json.loads(umbra(env, "token", "list", "--root", str(root), "--json").stdout)] == [
        "admin"
    ]
    for bad in (["--admin", "--repo", "x"], [], ["--repo", "../etc"]):
        done = umbra(env, "token", "add", "--root", str(root), *bad)
        assert done.returncode == 5 and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_points_an_append_only_client_plants_do_not_steer_prune(server: ServerProcess, tmp_path: Path) -> None:
    """F3: a client holding the key but only an append-only token adds points dated after the real
    ones (and in the future); the documented policy, --keep-within counted from now, keeps every
    real point, and points from the future are kept, reported, and counted by no rule."""
    full, source = alice_with_a_point(server, tmp_path)
    url = server.repo_url("alice")
    for seed in (2, 3):
        volume(source, seed=seed)
        assert umbra(cli_env(full), "backup", str(source), "--volume", "vol", "--repo", url).returncode == 0
    append = server.token("alice", append_only=True)
    repo = Repository.open(HttpBackend(url, append), "secret")
    real = repo.list_points()
    newest = real[-1]
    for i, when in enumerate([newest.time + timedelta(minutes=1 + i) for i in range(3)]):
        fake = replace(newest, id=f"{0xFA4E + i:064x}", time=when)
        repo.backend.store(f"points/{fake.id}", seal_point(repo.crypto, fake))
    for i in range(3):
        fake = replace(newest, id=f"{0xF07 + i:064x}", time=newest.time + timedelta(days=365 + i))
        repo.backend.store(f"points/{fake.id}", seal_point(repo.crypto, fake))
    pruned = umbra(cli_env(full), "prune", "--keep-within", "30d", "--repo", url, "--json")
    assert pruned.returncode == 0, pruned.stderr
    assert json.loads(pruned.stdout)["removed"] == []
    assert pruned.stderr.count("in the future") == 3
    left = {p.id for p in Repository.open(HttpBackend(url, full), "secret").list_points()}
    assert {p.id for p in real} <= left


def test_a_repository_at_its_quota_refuses_writes_and_prune_makes_room(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "srv", "--quota", "3M")
    try:
        token, url = server.token("alice"), server.repo_url("alice")
        env = cli_env(token)
        assert umbra(env, "init", "--repo", url).returncode == 0
        small = volume(tmp_path / "small.img", seed=1, size=4 * MiB)  # 128 KiB of data
        assert umbra(env, "backup", str(small), "--volume", "small", "--repo", url).returncode == 0
        big = tmp_path / "big.img"
        big.write_bytes(os.urandom(6 * MiB))
        refused = umbra(env, "backup", str(big), "--volume", "big", "--repo", url)
        assert refused.returncode == 21, refused.stderr
        assert "quota" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
        listed = json.loads(umbra(env, "list", "--repo", url, "--json").stdout)
        assert [p["volume"] for p in listed] == ["small"]  # no point from the refused backup
        stored = sum(f.stat().st_size for f in (server.root / "repos" / "alice").rglob("*") if f.is_file())
        assert stored <= 3 * MiB + 512 * 1024  # (at most one pack past it, sent alongside)
        pruned = umbra(env, "prune", "--keep-last", "1", "--repo", url)  # deletes what the refused run left
        assert pruned.returncode == 0, pruned.stderr
        after = sum(f.stat().st_size for f in (server.root / "repos" / "alice").rglob("*") if f.is_file())
        assert after < 1 * MiB < stored
        other = volume(tmp_path / "other.img", seed=2, size=16 * MiB)  # 512 KiB of new data
        again = umbra(env, "backup", str(other), "--volume", "other", "--repo", url)
        assert again.returncode == 0, again.stderr  # there is room again
        stats = server.request("GET", "/v1/admin/repos", server.admin_token()).json()
        assert stats["quota"] == 3 * MiB
    finally:
        server.stop()
