"""A repository kept by an umbra backup server (``umbra serve``), reached over HTTP(S).

``--repo https://backup.example:8473/NAME`` with a token (``UMBRA_TOKEN``, ``UMBRA_TOKEN_FILE`` or
``UMBRA_TOKEN_COMMAND``) that opens repository NAME there.  Objects arrive sealed: the server
never sees a key.  Reads are retried after connection failures and a server's 502/503/504; a
store is retried only when the connection failed before it was sent (a second attempt after an
ambiguous failure could find its own object and report it as existing).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from typing import Any

import urllib3

from umbra.errors import (
    ObjectMissing,
    RepositoryExists,
    RepositoryFull,
    RepositoryIOError,
    ServerAccessDenied,
)
from umbra.repo.backends.base import DIRECTORIES, Backend, validate_name

TIMEOUT = urllib3.Timeout(connect=10, read=300)
READ_RETRIES = urllib3.Retry(total=4, connect=4, read=2, status=3, backoff_factor=0.5, status_forcelist=(502, 503, 504))
WRITE_RETRIES = urllib3.Retry(total=3, connect=3, read=0, status=0, other=0, backoff_factor=0.5)


class HttpBackend(Backend):
    def __init__(self, url: str, token: str | None, ca_file: str | None = None) -> None:
        parts = urllib.parse.urlsplit(url)
        name = parts.path.strip("/")
        if parts.scheme not in ("http", "https") or not parts.netloc or not name or "/" in name:
            raise ServerAccessDenied(location=url, reason="give the repository as http(s)://HOST:PORT/NAME")
        if not token:
            raise ServerAccessDenied(location=url, reason="no token: set UMBRA_TOKEN or UMBRA_TOKEN_FILE")
        self.location = url
        self._base = f"{parts.scheme}://{parts.netloc}/v1/repos/{urllib.parse.quote(name, safe='')}"
        self._headers = {"Authorization": f"Bearer {token}"}
        tls: dict[str, Any] = {"ca_certs": ca_file} if ca_file else {}
        self._pool = urllib3.PoolManager(maxsize=16, block=False, timeout=TIMEOUT, **tls)

    def _request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> urllib3.BaseHTTPResponse:
        retries = READ_RETRIES if method in ("GET", "HEAD") else WRITE_RETRIES
        try:
            return self._pool.request(
                method,
                self._base + path,
                body=body,
                headers={**self._headers, **(headers or {})},
                retries=retries,
                redirect=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            raise RepositoryIOError(
                name=f"{method} {path or '/'}", reason=f"the server did not answer: {exc}"
            ) from None

    def _check(self, response: urllib3.BaseHTTPResponse, what: str) -> None:
        """Raise the umbra error a failed answer stands for."""
        status = response.status
        if status < 400:
            return
        text = response.data.decode(errors="replace").strip()[:200]
        if status == 401:
            raise ServerAccessDenied(location=self.location, reason="the token is not valid (revoked?)")
        if status == 429:
            raise ServerAccessDenied(location=self.location, reason="too many failed logins from here; wait")
        if status == 403:
            raise ServerAccessDenied(location=self.location, reason=f"{text} ({what})")
        if status == 507:
            raise RepositoryFull(f"the backup server refused {what}: {text}", name=what)
        raise RepositoryIOError(name=what, reason=f"the server answered {status}: {text}")

    def _object(self, name: str) -> str:
        return "/objects/" + urllib.parse.quote(validate_name(name))

    def _repository_missing(self) -> ServerAccessDenied:
        return ServerAccessDenied(location=self.location, reason="no such repository for this token")

    def exists(self) -> bool:
        response = self._request("GET", "")
        if response.status == 404:
            raise self._repository_missing()
        self._check(response, "the repository")
        return bool(response.json().get("exists"))

    def create(self) -> None:
        response = self._request("POST", "")
        if response.status == 409:
            raise RepositoryExists(location=self.location)
        if response.status == 404:
            raise self._repository_missing()
        self._check(response, "the repository")

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        headers = None
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            if length == 0:
                return b""
            headers = {"Range": f"bytes={offset}-{end}"}
        response = self._request("GET", self._object(name), headers=headers)
        if response.status == 404:
            raise ObjectMissing(name=name)
        self._check(response, name)
        return bytes(response.data)

    def store(self, name: str, data: bytes, replace: bool = False) -> None:
        path = self._object(name) + ("?replace=1" if replace else "")
        response = self._request("PUT", path, body=bytes(data))
        if response.status == 409:
            raise FileExistsError(name)
        self._check(response, name)

    def delete(self, name: str) -> None:
        response = self._request("DELETE", self._object(name))
        if response.status == 404:
            raise ObjectMissing(name=name)
        self._check(response, name)

    def size(self, name: str) -> int:
        response = self._request("HEAD", self._object(name))
        if response.status == 404:
            raise ObjectMissing(name=name)
        self._check(response, name)
        return int(response.headers["Content-Length"])

    def list(self, directory: str) -> Iterator[str]:
        assert directory in DIRECTORIES
        response = self._request("GET", f"/list/{directory}")
        self._check(response, f"{directory}/")
        names = response.json()["names"]
        for name in names:
            yield validate_name(name)

    def remove_temporaries(self) -> int:
        response = self._request("POST", "/temporaries")
        self._check(response, "temporaries")
        return int(response.json()["removed"])
