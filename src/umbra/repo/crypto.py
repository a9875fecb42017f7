"""Blob ids, compression and authenticated encryption of everything the repository stores.

* Blob ids are keyed BLAKE3-256 of the plaintext: identical data dedups inside one repository,
  and ids reveal nothing to someone without the key (two repositories give different ids).
* Sealed envelopes use AES-256-GCM with a per-session key derived from the master key and a random
  16-byte session id; nonces are a per-session counter, so no (key, nonce) pair ever repeats and no
  key encrypts more than 2**32 messages (a new session starts before that).
* Associated data binds what an object *means*: its kind, its id or name and the repository id, so a
  blob cannot be swapped for another, nor a tree node passed off as data, nor a blob grafted in from
  another repository.
* With ``encryption = none`` the envelope carries a BLAKE3 checksum of (associated data, payload)
  instead, so corruption is still detected.
"""

from __future__ import annotations

import itertools
import os
import threading

import blake3
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from umbra.errors import IntegrityError
from umbra.repo.format import (
    AAD_BLOB,
    ENVELOPE_HEADER,
    KDF_CONTEXT_SESSION,
    NONCE_SIZE,
    PLAIN_CHECKSUM_SIZE,
    SESSION_ID_SIZE,
    TAG_SIZE,
    BlobType,
    Compression,
    Suite,
)

ZSTD_LEVEL = 3
_MAX_NONCES_PER_SESSION = 2**32
_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    comp = getattr(_local, "compressor", None)
    if comp is None:
        comp = _local.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec = getattr(_local, "decompressor", None)
    if dec is None:
        dec = _local.decompressor = zstandard.ZstdDecompressor()
    return dec


class Crypto:
    """Seals and opens objects for one repository.  Thread-safe."""

    def __init__(self, repo_id: bytes, id_key: bytes, enc_key: bytes | None) -> None:
        self.repo_id = repo_id
        self._id_key = id_key
        self._enc_key = enc_key
        self._session_lock = threading.Lock()
        self._session: tuple[bytes, AESGCM, itertools.count[int]] | None = None
        self._open_cache: dict[bytes, AESGCM] = {}

    @property
    def encrypted(self) -> bool:
        return self._enc_key is not None

    def derived_key(self, context: str) -> bytes:
        """A key for local use (``context`` names it), derived from the id key: it needs the
        passphrase of an encrypted repository, and reveals nothing of the id key."""
        return blake3.blake3(self._id_key, derive_key_context=context).digest()

    def blob_id(self, data: bytes | bytearray | memoryview) -> bytes:
        return blake3.blake3(data, key=self._id_key, max_threads=1).digest()

    # --- envelopes -------------------------------------------------------------------------

    def _session_key(self, session_id: bytes) -> AESGCM:
        assert self._enc_key is not None
        material = blake3.blake3(self._enc_key + session_id, derive_key_context=KDF_CONTEXT_SESSION).digest()
        return AESGCM(material)

    def _next_nonce(self) -> tuple[bytes, AESGCM, bytes]:
        with self._session_lock:
            while True:
                if self._session is None:
                    sid = os.urandom(SESSION_ID_SIZE)
                    self._session = (sid, self._session_key(sid), itertools.count())
                sid, aead, counter = self._session
                n = next(counter)
                if n < _MAX_NONCES_PER_SESSION:
                    return sid, aead, n.to_bytes(NONCE_SIZE, "little")
                self._session = None  # this key has done its share: a new session, a new key

    def seal(self, payload: bytes, aad: bytes) -> bytes:
        """Encrypt and authenticate ``payload``, binding ``aad``."""
        full_aad = aad + self.repo_id
        if self._enc_key is None:
            check = blake3.blake3(full_aad + payload).digest()
            return bytes([Suite.NONE]) + payload + check
        sid, aead, nonce = self._next_nonce()
        return ENVELOPE_HEADER.pack(Suite.AES256GCM, sid, nonce) + aead.encrypt(nonce, payload, full_aad)

    def open(self, envelope: bytes | memoryview, aad: bytes, what: str) -> bytes:
        """Authenticate and decrypt an envelope.

        Raises:
            IntegrityError: the envelope is damaged, forged, or belongs elsewhere (``what`` names it).
        """
        full_aad = aad + self.repo_id
        env = bytes(envelope)
        if not env:
            raise IntegrityError(f"{what}: empty object")
        suite = env[0]
        if self._enc_key is None:
            if suite != Suite.NONE or len(env) < 1 + PLAIN_CHECKSUM_SIZE:
                raise IntegrityError(f"{what}: not an unencrypted envelope")
            payload, check = env[1:-PLAIN_CHECKSUM_SIZE], env[-PLAIN_CHECKSUM_SIZE:]
            if blake3.blake3(full_aad + payload).digest() != check:
                raise IntegrityError(f"{what}: checksum mismatch")
            return payload
        if suite != Suite.AES256GCM or len(env) < ENVELOPE_HEADER.size + TAG_SIZE:
            raise IntegrityError(f"{what}: not an encrypted envelope")
        _, sid, nonce = ENVELOPE_HEADER.unpack_from(env)
        aead = self._open_cache.get(sid)
        if aead is None:
            if len(self._open_cache) > 4096:
                self._open_cache.clear()
            aead = self._open_cache[sid] = self._session_key(sid)
        try:
            return aead.decrypt(nonce, env[ENVELOPE_HEADER.size :], full_aad)
        except InvalidTag:
            raise IntegrityError(f"{what}: authentication failed") from None

    # --- blobs -----------------------------------------------------------------------------

    @staticmethod
    def blob_aad(blob_type: BlobType, blob_id: bytes) -> bytes:
        return AAD_BLOB + bytes([blob_type]) + blob_id

    def seal_blob(self, blob_type: BlobType, blob_id: bytes, data: bytes | bytearray | memoryview) -> bytes:
        """Compress (when that helps) and seal one blob."""
        packed = _compressor().compress(data)
        if len(packed) < len(data) - len(data) // 64:
            plain = bytes([Compression.ZSTD]) + packed
        else:
            plain = bytes([Compression.NONE]) + bytes(data)
        return self.seal(plain, self.blob_aad(blob_type, blob_id))

    def open_blob(
        self, blob_type: BlobType, blob_id: bytes, envelope: bytes | memoryview, max_size: int, what: str
    ) -> bytes:
        """Open, decompress and verify one blob against its id.

        Raises:
            IntegrityError: anything does not match; never returns wrong bytes.
        """
        plain = self.open(envelope, self.blob_aad(blob_type, blob_id), what)
        if not plain:
            raise IntegrityError(f"{what}: empty blob")
        comp, body = plain[0], memoryview(plain)[1:]
        if comp == Compression.ZSTD:
            try:
                data = _decompressor().decompress(body, max_output_size=max_size)
            except zstandard.ZstdError as exc:
                raise IntegrityError(f"{what}: cannot decompress ({exc})") from None
        elif comp == Compression.NONE:
            data = bytes(body)
        else:
            raise IntegrityError(f"{what}: unknown compression {comp}")
        if len(data) > max_size or self.blob_id(data) != blob_id:
            raise IntegrityError(f"{what}: content does not match its id")
        return data
