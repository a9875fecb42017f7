"""Keys and passphrases (RELIABILITY E1, E3)."""

import hashlib
import json
from pathlib import Path

import pytest

from umbra.errors import IntegrityError, KeyProblem, PassphraseMissing, WrongPassphrase
from umbra.repo.backends import LocalBackend
from umbra.repo.repository import Repository


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_wrong_passphrase_leaves_repository_bit_identical(tmp_path: Path) -> None:
    Repository.init(LocalBackend(tmp_path / "r"), "right")
    before = tree_digest(tmp_path / "r")
    with pytest.raises(WrongPassphrase):
        Repository.open(LocalBackend(tmp_path / "r"), "wrong")
    with pytest.raises(PassphraseMissing):
        Repository.open(LocalBackend(tmp_path / "r"), None)
    assert tree_digest(tmp_path / "r") == before


def test_several_keys_add_remove_passwd(tmp_path: Path) -> None:
    r = Repository.init(LocalBackend(tmp_path / "r"), "one")
    second = r.add_key("two", label="ops")
    assert Repository.open(LocalBackend(tmp_path / "r"), "two").key_id == second
    assert {k["label"] for k in r.list_keys()} == {"", "ops"}
    r.remove_key(second)
    with pytest.raises(WrongPassphrase):
        Repository.open(LocalBackend(tmp_path / "r"), "two")
    with pytest.raises(KeyProblem):
        r.remove_key(r.key_id or "")  # the last key
    r.change_passphrase("three")
    with pytest.raises(WrongPassphrase):
        Repository.open(LocalBackend(tmp_path / "r"), "one")
    assert Repository.open(LocalBackend(tmp_path / "r"), "three").crypto.blob_id(b"x") == r.crypto.blob_id(b"x")


def test_kdf_downgrade_refused(tmp_path: Path) -> None:
    r = Repository.init(LocalBackend(tmp_path / "r"), "pw")
    path = tmp_path / "r" / "keys" / (r.key_id or "")
    doc = json.loads(path.read_text())
    doc["kdf"]["iterations"] = doc["kdf"]["iterations"] + 1  # any edit of the parameters
    path.write_text(json.dumps(doc))
    with pytest.raises(WrongPassphrase):
        Repository.open(LocalBackend(tmp_path / "r"), "pw")


def test_damaged_key_file(tmp_path: Path) -> None:
    r = Repository.init(LocalBackend(tmp_path / "r"), "pw")
    path = tmp_path / "r" / "keys" / (r.key_id or "")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(KeyProblem):
        Repository.open(LocalBackend(tmp_path / "r"), "pw")


def test_config_tampering_refused(tmp_path: Path) -> None:
    Repository.init(LocalBackend(tmp_path / "r"), "pw")
    cfg = tmp_path / "r" / "config"
    doc = json.loads(cfg.read_text())
    doc["encryption"] = "none"
    doc["id_key"] = "AAAA"
    cfg.write_text(json.dumps(doc))
    with pytest.raises(IntegrityError):
        Repository.open(LocalBackend(tmp_path / "r"), "pw")
    doc["encryption"] = "aes-256-gcm"
    doc["block_size"] = 8192
    del doc["id_key"]
    cfg.write_text(json.dumps(doc))
    with pytest.raises(IntegrityError):
        Repository.open(LocalBackend(tmp_path / "r"), "pw")
