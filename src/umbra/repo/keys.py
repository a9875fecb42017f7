"""Key files: a random master key wrapped by a passphrase.

A key file (``keys/<key id>``, JSON) holds the KDF algorithm, its parameters and salt, and the
master key sealed with AES-256-GCM under the passphrase-derived key.  The associated data is the
canonical JSON of the key id, repository id and KDF block, so editing the parameters (a downgrade)
makes the key fail to open.  The sealed payload also carries the digest of the repository's
``config``, so a config edited by the storage (for example to turn encryption off) is refused.
"""

from __future__ import annotations

import base64
import json
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from umbra.errors import KeyProblem
from umbra.repo.format import AAD_KEY, NONCE_SIZE
from umbra.testing_knobs import testonly_enabled

DEFAULT_KDF = {"algorithm": "argon2id", "memory_kib": 65536, "iterations": 3, "lanes": 4}
WEAK_KDF = {"algorithm": "argon2id", "memory_kib": 64, "iterations": 1, "lanes": 1}
FLOOR_MEMORY_KIB = 16384


@dataclass(frozen=True)
class MasterKey:
    enc_key: bytes
    id_key: bytes
    config_digest: str


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


def _derive(passphrase: str, kdf: dict[str, Any]) -> bytes:
    if kdf.get("algorithm") != "argon2id":
        raise KeyProblem(f"unsupported KDF {kdf.get('algorithm')!r}")
    return Argon2id(
        salt=_unb64(kdf["salt"]),
        length=32,
        iterations=int(kdf["iterations"]),
        lanes=int(kdf["lanes"]),
        memory_cost=int(kdf["memory_kib"]),
    ).derive(passphrase.encode())


def _aad(key_id: str, repo_id: str, kdf: dict[str, Any]) -> bytes:
    return (
        AAD_KEY
        + json.dumps({"id": key_id, "repository": repo_id, "kdf": kdf}, sort_keys=True, separators=(",", ":")).encode()
    )


def default_kdf() -> dict[str, Any]:
    params = dict(WEAK_KDF if testonly_enabled("WEAK_KDF") else DEFAULT_KDF)
    params["salt"] = _b64(os.urandom(16))
    return params


def make_key_file(master: MasterKey, repo_id: str, passphrase: str, label: str = "") -> tuple[str, bytes]:
    """Wrap ``master`` with ``passphrase``; returns (key id, key file bytes)."""
    key_id = os.urandom(8).hex()
    kdf = default_kdf()
    secret = json.dumps(
        {
            "enc_key": _b64(master.enc_key),
            "id_key": _b64(master.id_key),
            "config_digest": master.config_digest,
        }
    ).encode()
    nonce = os.urandom(NONCE_SIZE)
    sealed = AESGCM(_derive(passphrase, kdf)).encrypt(nonce, secret, _aad(key_id, repo_id, kdf))
    doc = {
        "format": 1,
        "id": key_id,
        "repository": repo_id,
        "created": datetime.now(UTC).isoformat(),
        "host": socket.gethostname(),
        "label": label,
        "kdf": kdf,
        "wrapped": _b64(nonce + sealed),
    }
    return key_id, json.dumps(doc, indent=1).encode()


def parse_key_file(data: bytes, name: str) -> dict[str, Any]:
    """Parse a key file's outer JSON, checking its shape (not its secret)."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != 1:
            raise ValueError("unknown key file format")
        for field in ("id", "repository", "kdf", "wrapped"):
            if field not in doc:
                raise ValueError(f"missing {field}")
        if not isinstance(doc["kdf"], dict):
            raise ValueError("bad kdf block")
        return doc
    except (ValueError, RecursionError) as exc:  # (UnicodeDecodeError is a ValueError)
        raise KeyProblem(f"key file {name} is damaged ({exc})") from None


def unwrap(doc: dict[str, Any], passphrase: str) -> MasterKey | None:
    """The master key, or None if ``passphrase`` does not open this key file."""
    kdf = doc["kdf"]
    try:
        if int(kdf["memory_kib"]) < FLOOR_MEMORY_KIB and not testonly_enabled("WEAK_KDF"):
            raise KeyProblem(f"key {doc['id']} has KDF parameters below the safe floor; refusing it")
        blob = _unb64(doc["wrapped"])
        key = _derive(passphrase, kdf)
    except (KeyError, ValueError, TypeError) as exc:
        raise KeyProblem(f"key {doc.get('id')} is damaged ({exc})") from None
    try:
        secret = AESGCM(key).decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:], _aad(doc["id"], doc["repository"], kdf))
    except InvalidTag:
        return None
    fields = json.loads(secret)
    return MasterKey(_unb64(fields["enc_key"]), _unb64(fields["id_key"]), fields["config_digest"])
