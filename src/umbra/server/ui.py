"""The server's web UI: for an administrator with an admin token, every repository (size, packs,
points, when the newest point arrived, who holds a lock) and every token, with a button to revoke
it.  Pages are rendered on the server (no scripts); a login makes a session cookie (HttpOnly,
SameSite=Strict, Secure over TLS) that ends with its token; forms carry the session's CSRF value;
every page sends a Content-Security-Policy that allows nothing but this server's own stylesheet.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from html import escape
from typing import TYPE_CHECKING

from aiohttp import web

from umbra.server.stats import RepoStats, all_repos, repo_stats
from umbra.server.tokens import Token

if TYPE_CHECKING:
    from umbra.server.app import Server

SESSION_COOKIE = "umbra_session"
SESSION_S = 8 * 3600
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
table { border-collapse: collapse; margin-bottom: 2rem; }
th, td { border-bottom: 1px solid #ccc; padding: .3rem .8rem; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.error { color: #b00; }
.busy { color: #06c; }
form.inline { display: inline; }
"""


@dataclass
class Session:
    token_id: str
    expires: float
    csrf: str


class WebUI:
    """The pages, over a :class:`~umbra.server.app.Server`'s tokens and repositories."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.sessions: dict[str, Session] = {}

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/ui", self.home)
        app.router.add_get("/ui/", self.dashboard)
        app.router.add_get("/ui/login", self.login_form)
        app.router.add_post("/ui/login", self.login)
        app.router.add_post("/ui/logout", self.logout)
        app.router.add_post("/ui/tokens/{token_id}/revoke", self.revoke)
        app.router.add_get("/ui/style.css", self.style)

    # --- sessions ----------------------------------------------------------------------------

    def _session(self, request: web.Request) -> tuple[Session, Token] | None:
        sid = request.cookies.get(SESSION_COOKIE, "")
        session = self.sessions.get(sid)
        if session is None:
            return None
        token = self.server.tokens.tokens().get(session.token_id)
        if session.expires < time.monotonic() or token is None or token.role != "admin":
            del self.sessions[sid]  # expired, or its token was revoked
            return None
        return session, token

    def _require(self, request: web.Request) -> tuple[Session, Token]:
        found = self._session(request)
        if found is None:
            raise web.HTTPSeeOther("/ui/login")
        return found

    def _check_csrf(self, session: Session, form: dict[str, str]) -> None:
        if not hmac.compare_digest(form.get("csrf", ""), session.csrf):
            raise web.HTTPForbidden(text="the form is stale: reload the page\n")

    # --- pages -------------------------------------------------------------------------------

    async def home(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPSeeOther("/ui/")

    async def style(self, request: web.Request) -> web.Response:
        return web.Response(text=STYLE, content_type="text/css", headers=HEADERS)

    async def login_form(self, request: web.Request) -> web.Response:
        return _page("umbra: log in", _login_body(""))

    async def login(self, request: web.Request) -> web.Response:
        address = request.remote or "?"
        if self.server.failed_logins.blocked(address):
            raise web.HTTPTooManyRequests(text="too many failed logins from this address; wait\n")
        form = await request.post()
        token = self.server.tokens.verify(str(form.get("token", "")).strip())
        if token is None or token.role != "admin":
            self.server.failed_logins.failed(address)
            return _page("umbra: log in", _login_body("That is not an admin token of this server."), status=403)
        sid = secrets.token_urlsafe(32)
        self.sessions[sid] = Session(token.id, time.monotonic() + SESSION_S, secrets.token_urlsafe(32))
        response = web.HTTPSeeOther("/ui/")
        response.set_cookie(
            SESSION_COOKIE, sid, httponly=True, samesite="Strict", secure=request.secure, path="/ui", max_age=SESSION_S
        )
        raise response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        session, _ = self._require(request)
        self._check_csrf(session, {k: str(v) for k, v in (await request.post()).items()})
        self.sessions.pop(request.cookies.get(SESSION_COOKIE, ""), None)
        response = web.HTTPSeeOther("/ui/login")
        response.del_cookie(SESSION_COOKIE, path="/ui")
        raise response

    async def revoke(self, request: web.Request) -> web.StreamResponse:
        session, admin = self._require(request)
        self._check_csrf(session, {k: str(v) for k, v in (await request.post()).items()})
        token_id = request.match_info["token_id"]
        if token_id == admin.id:
            raise web.HTTPForbidden(text="revoke your own token with `umbra token revoke`\n")
        await self.server.run(self.server.tokens.revoke, token_id)
        raise web.HTTPSeeOther("/ui/")

    async def dashboard(self, request: web.Request) -> web.Response:
        session, admin = self._require(request)
        root = self.server.root
        stats = await self.server.run(lambda: [repo_stats(root, name) for name in all_repos(root)])
        tokens = sorted(self.server.tokens.tokens().values(), key=lambda t: (t.repo, t.created))
        repos, tokens_table = _repos_table(stats, self.server.quota), _tokens_table(tokens, admin, session.csrf)
        body = (
            f"<h1>umbra backup server</h1><p>{escape(str(root))} &middot; logged in with token {escape(admin.id)} "
            f"{_form('/ui/logout', session.csrf, 'Log out')}</p>"
            f"<h2>Repositories</h2>{repos}<h2>Tokens</h2>{tokens_table}"
        )
        return _page("umbra backup server", body)


def _page(title: str, body: str, status: int = 200) -> web.Response:
    html = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f'<link rel="stylesheet" href="/ui/style.css"></head><body>{body}</body></html>'
    )
    return web.Response(text=html, content_type="text/html", status=status, headers=HEADERS)


def _login_body(error: str) -> str:
    shown = f'<p class="error" id="error">{escape(error)}</p>' if error else ""
    return (
        f"<h1>umbra backup server</h1>{shown}"
        '<form method="post" action="/ui/login"><label>Admin token '
        '<input type="password" name="token" id="token" autocomplete="off" size="70"></label> '
        '<button type="submit" id="login">Log in</button></form>'
    )


def _form(action: str, csrf: str, label: str, element_id: str = "") -> str:
    button_id = f' id="{escape(element_id)}"' if element_id else ""
    return (
        f'<form class="inline" method="post" action="{escape(action)}">'
        f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
        f'<button type="submit"{button_id}>{escape(label)}</button></form>'
    )


def _when(stamp: float | None) -> str:
    return datetime.fromtimestamp(stamp).astimezone().strftime("%Y-%m-%d %H:%M:%S") if stamp else "-"


def _size(n: int) -> str:
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"


def _repos_table(stats: list[RepoStats], quota: int | None) -> str:
    if not stats:
        return "<p>No repositories yet.</p>"
    rows = []
    of_quota = f" of {_size(quota)}" if quota else ""
    for s in stats:
        locks = ", ".join(
            f'<span class="{"error" if lock.stale else "busy"}">'
            f"{'prune' if lock.exclusive else 'backup'} by {escape(lock.host)} pid {lock.pid}"
            f"{' (stale)' if lock.stale else ''}</span>"
            for lock in s.locks
        )
        rows.append(
            f'<tr id="repo-{escape(s.name)}"><td>{escape(s.name)}</td>'
            + (
                f'<td class="n">{_size(s.bytes)}{of_quota}</td><td class="n">{s.packs}</td>'
                f'<td class="n points">{s.points}</td><td>{_when(s.newest_point)}</td><td>{locks or "-"}</td>'
                if s.exists
                else '<td colspan="5">not initialised</td>'
            )
            + "</tr>"
        )
    head = "<tr><th>repository</th><th>size</th><th>packs</th><th>points</th><th>newest point</th><th>locks</th></tr>"
    return f'<table id="repos">{head}{"".join(rows)}</table>'


def _tokens_table(tokens: list[Token], admin: Token, csrf: str) -> str:
    rows = []
    for t in tokens:
        action = (
            "(this session)"
            if t.id == admin.id
            else _form(f"/ui/tokens/{t.id}/revoke", csrf, "Revoke", f"revoke-{t.id}")
        )
        rows.append(
            f'<tr id="token-{escape(t.id)}"><td>{escape(t.id)}</td><td>{escape(t.repo)}</td><td>{escape(t.role)}</td>'
            f"<td>{escape(t.created)}</td><td>{escape(t.label)}</td><td>{action}</td></tr>"
        )
    head = "<tr><th>token</th><th>repository</th><th>role</th><th>created</th><th>label</th><th></th></tr>"
    return f'<table id="tokens">{head}{"".join(rows)}</table>'
