"""The backup server's HTTP API: repositories kept for many clients, each reachable only with its
own token (restic's rest-server and borg's ``serve --restrict-to-repository`` are the models).

The server stores sealed objects and never sees a key: clients encrypt, hash and deduplicate, and
each repository belongs to one client, so no client can learn anything of another's data (not even
whether a block exists there: there is no shared store to ask).  Every request names its
repository; a token that does not open that repository gets 404, as a repository that does not
exist does, so names cannot be probed.  Append-only tokens may read and add objects, and remove or
refresh only the lock files they created themselves.

Routes (``{repo}``: ``[a-z0-9][a-z0-9_-]{0,63}``; ``{name}``: a repository object name)::

    GET    /v1/repos/{repo}                  {"exists": bool}
    POST   /v1/repos/{repo}                  create the repository's directories
    GET    /v1/repos/{repo}/objects/{name}   an object; a Range header (bytes=A-B) for a part
    HEAD   /v1/repos/{repo}/objects/{name}   its size (Content-Length)
    PUT    /v1/repos/{repo}/objects/{name}   store; ?replace=1 replaces (409 if it exists without)
    DELETE /v1/repos/{repo}/objects/{name}
    GET    /v1/repos/{repo}/list/{directory} {"names": [...]}
    POST   /v1/repos/{repo}/temporaries      remove half-written leftovers (full tokens)
    GET    /v1/admin/repos                   every repository's statistics (admin tokens)
    GET    /v1/health                        {"ok": true}, without a token
    /ui/...                                  the web UI (:mod:`umbra.server.ui`; its own login)

Admin tokens open no repository: they read statistics and manage tokens.

Failed logins are limited per client address (a token bucket: FAILED_BURST at once, FAILED_RATE
a second after that); past the limit every request from that address gets 429, whatever token it
carries, until the bucket refills.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from umbra.errors import ObjectMissing, RepositoryExists, RepositoryFull, UmbraError, UsageError
from umbra.repo.backends.base import DIRECTORIES, validate_name
from umbra.repo.backends.local import LocalBackend
from umbra.server.stats import all_repos, repo_stats
from umbra.server.tokens import REPO_NAME, Token, TokenStore
from umbra.server.ui import WebUI

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_OBJECT = 256 << 20  # a pack is 16-64 MiB
MAX_BODIES = 8  # objects held in memory at once (uploads and downloads); other requests wait their turn
FAILED_BURST = 5
FAILED_RATE = 2.0  # failed logins a second, per address, once the burst is spent
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")
TOKEN_KEY = web.RequestKey("token", Token)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _FailedLogins:
    """A token bucket of failed logins per client address."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens left, when)

    def _level(self, address: str, now: float) -> float:
        tokens, when = self._buckets.get(address, (FAILED_BURST, now))
        return min(FAILED_BURST, tokens + (now - when) * FAILED_RATE)

    def blocked(self, address: str) -> bool:
        return self._level(address, time.monotonic()) < 1

    def failed(self, address: str) -> None:
        now = time.monotonic()
        self._buckets[address] = (max(0.0, self._level(address, now) - 1), now)
        if len(self._buckets) > 100_000:  # forget addresses whose bucket is full again
            self._buckets = {a: b for a, b in self._buckets.items() if self._level(a, now) < FAILED_BURST}


class Server:
    """The repositories under ``root/repos`` and the tokens of ``tokens``."""

    def __init__(self, root: Path, tokens: TokenStore, workers: int = 16, quota: int | None = None) -> None:
        self.root = root
        self.tokens = tokens
        self.quota = quota  # bytes per repository, or None
        self._usage: dict[str, int] = {}  # repository -> bytes it holds (with a quota: counted once, then kept)
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="umbra-serve")
        self.failed_logins = _FailedLogins()
        self._lock_owners: dict[tuple[str, str], str] = {}  # (repo, lock name) -> token id
        self._bodies: asyncio.Semaphore | None = None  # made in the server's loop

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_OBJECT, middlewares=[self._errors, self._auth])
        base = "/v1/repos/{repo}"
        app.router.add_get(base, self.get_repo)
        app.router.add_post(base, self.create_repo)
        app.router.add_get(base + "/objects/{name:.+}", self.load)  # (GET also answers HEAD)
        app.router.add_put(base + "/objects/{name:.+}", self.store)
        app.router.add_delete(base + "/objects/{name:.+}", self.delete)
        app.router.add_get(base + "/list/{directory}", self.list)
        app.router.add_post(base + "/temporaries", self.temporaries)
        app.router.add_get("/v1/admin/repos", self.admin_repos)
        app.router.add_get("/v1/health", self.health)
        WebUI(self).add_routes(app)
        return app

    # --- middleware --------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every failure is a short plain-text answer; nothing of a traceback leaves the server."""
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except ObjectMissing:
            raise web.HTTPNotFound(text="no such object\n") from None
        except FileExistsError:
            raise web.HTTPConflict(text="the object exists\n") from None
        except RepositoryExists:
            raise web.HTTPConflict(text="the repository exists\n") from None
        except RepositoryFull:
            raise web.HTTPInsufficientStorage(text="the server's storage is full\n") from None
        except UmbraError as exc:
            log.warning("%s %s: %s", request.method, request.path, exc)
            raise web.HTTPInternalServerError(text="the server could not do that (see its log)\n") from None

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/ui" or request.path.startswith("/ui/"):
            return await handler(request)  # the web UI's own login and session cookie
        if request.path == "/v1/health":
            return await handler(request)  # for load balancers and monitoring: says nothing else
        address = request.remote or "?"
        if self.failed_logins.blocked(address):
            raise web.HTTPTooManyRequests(text="too many failed logins from this address; wait\n")
        header = request.headers.get("Authorization", "")
        try:
            token = self.tokens.verify(header.removeprefix("Bearer ")) if header.startswith("Bearer ") else None
        except UsageError as exc:  # a damaged tokens file: nobody gets in
            log.error("%s", exc)
            raise web.HTTPServiceUnavailable(text="the server's tokens are unreadable\n") from None
        if token is None:
            self.failed_logins.failed(address)
            log.info("refused %s %s from %s: no valid token", request.method, request.path, address)
            raise web.HTTPUnauthorized(text="a valid token is needed\n", headers={"WWW-Authenticate": "Bearer"})
        if request.path.startswith("/v1/admin/"):
            if token.role != "admin":
                raise web.HTTPNotFound(text="no such page\n")
        elif request.match_info.get("repo") != token.repo:  # another client's repository looks like none
            raise web.HTTPNotFound(text="no such repository\n")
        request[TOKEN_KEY] = token
        return await handler(request)

    # --- handlers ----------------------------------------------------------------------------

    def _backend(self, request: web.Request) -> LocalBackend:
        repo = request.match_info["repo"]
        if not REPO_NAME.fullmatch(repo):
            raise web.HTTPNotFound(text="no such repository\n")
        return LocalBackend(self.root / "repos" / repo)

    def _name(self, request: web.Request) -> str:
        try:
            return validate_name(request.match_info["name"])
        except ValueError:
            raise web.HTTPNotFound(text="no such object\n") from None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def get_repo(self, request: web.Request) -> web.Response:
        return web.json_response({"exists": await self.run(self._backend(request).exists)})

    async def create_repo(self, request: web.Request) -> web.Response:
        await self.run(self._backend(request).create)
        return web.json_response({"created": True}, status=201)

    async def load(self, request: web.Request) -> web.StreamResponse:
        backend, name = self._backend(request), self._name(request)
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": str(await self.run(backend.size, name))})
        offset, length = 0, None
        wanted = request.headers.get("Range")
        if wanted is not None:
            match = _RANGE.fullmatch(wanted.strip())
            if match is None:
                raise web.HTTPRequestRangeNotSatisfiable(text="only one range, bytes=A-B\n")
            offset = int(match.group(1))
            if match.group(2):
                length = max(0, int(match.group(2)) - offset + 1)
        async with self._body_slot():
            data = await self.run(backend.load, name, offset, length)
            response = web.Response(body=data, content_type="application/octet-stream")
            await response.prepare(request)
            await response.write_eof()
            return response

    async def store(self, request: web.Request) -> web.Response:
        backend, name, token = self._backend(request), self._name(request), request[TOKEN_KEY]
        replace = request.query.get("replace") == "1"
        if replace and not self._may_change(token, name):
            raise web.HTTPForbidden(text="this token may not replace objects\n")
        async with self._body_slot():
            data = await request.read()
            if self.quota is None:
                await self.run(backend.store, name, data, replace)
            else:
                await self._store_within_quota(token.repo, backend, name, data, replace)
        if name.startswith("locks/") and not replace:
            self._lock_owners[(token.repo, name)] = token.id
        return web.Response(status=201)

    async def delete(self, request: web.Request) -> web.Response:
        backend, name, token = self._backend(request), self._name(request), request[TOKEN_KEY]
        if not self._may_change(token, name):
            raise web.HTTPForbidden(text="this token may not delete objects\n")
        size = await self.run(backend.size, name) if token.repo in self._usage else 0
        await self.run(backend.delete, name)
        if token.repo in self._usage:
            self._usage[token.repo] -= size
        self._lock_owners.pop((token.repo, name), None)
        return web.Response(status=204)

    async def list(self, request: web.Request) -> web.Response:
        directory = request.match_info["directory"]
        if directory not in DIRECTORIES:
            raise web.HTTPNotFound(text="no such directory\n")
        backend = self._backend(request)
        names = await self.run(lambda: list(backend.list(directory)))
        return web.json_response({"names": names})

    async def temporaries(self, request: web.Request) -> web.Response:
        if request[TOKEN_KEY].role != "full":
            raise web.HTTPForbidden(text="this token may not remove objects\n")
        self._usage.pop(request[TOKEN_KEY].repo, None)  # (counted again when needed)
        return web.json_response({"removed": await self.run(self._backend(request).remove_temporaries)})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def admin_repos(self, request: web.Request) -> web.Response:
        """Every repository's statistics (admin tokens)."""
        root = self.root
        stats = await self.run(lambda: [repo_stats(root, name).to_dict() for name in all_repos(root)])
        return web.json_response({"repos": stats, "quota": self.quota})

    async def _store_within_quota(
        self, repo: str, backend: LocalBackend, name: str, data: bytes, replace: bool
    ) -> None:
        """Store unless the repository would pass the quota (checked before each object: two
        uploads at once may pass it by one object)."""
        if repo not in self._usage:
            self._usage[repo] = await self.run(_bytes_under, backend.root)
        old = 0
        if replace:
            with contextlib.suppress(ObjectMissing):
                old = await self.run(backend.size, name)
        assert self.quota is not None
        if self._usage[repo] - old + len(data) > self.quota:
            log.warning("repository %s is at its quota of %d bytes: refused %s", repo, self.quota, name)
            raise web.HTTPInsufficientStorage(text=f"the repository is at its quota of {self.quota} bytes\n")
        await self.run(backend.store, name, data, replace)
        self._usage[repo] += len(data) - old

    def _body_slot(self) -> asyncio.Semaphore:
        """At most MAX_BODIES objects in memory at once, however many clients send or fetch packs."""
        if self._bodies is None:
            self._bodies = asyncio.Semaphore(MAX_BODIES)
        return self._bodies

    def _may_change(self, token: Token, name: str) -> bool:
        """Full tokens change anything; append-only ones only the lock files they created."""
        return token.role == "full" or self._lock_owners.get((token.repo, name)) == token.id


def _bytes_under(path: Path) -> int:
    return sum(os.stat(os.path.join(d, f)).st_size for d, _, files in os.walk(path) for f in files)
