"""The command line as a user runs it: exit codes, one-line errors, --json shapes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine.helpers import sha


def umbra(*args: str, env: dict[str, str] | None = None, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "umbra.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = dict(os.environ)
    e.update(UMBRA_REPO=str(tmp_path / "repo"), UMBRA_PASSWORD="hunter2")
    return e


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    img = tmp_path / "vol.img"
    img.write_bytes(random.Random(3).randbytes(1_000_000) + bytes(500_000))
    return img


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("umbra: error: ") and text in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_full_cycle_with_json(env: dict[str, str], volume: Path, tmp_path: Path) -> None:
    init = json.loads(umbra("init", "--json", env=env).stdout)
    assert init["encryption"] == "aes-256-gcm"
    set1 = json.loads(umbra("backup", str(volume), "--volume", "vol", "--tag", "a", "--json", env=env).stdout)
    assert set1["consistency"] == "offline" and [p["name"] for p in set1["phases"]][:3] == [
        "gather",
        "select",
        "prepare",
    ]
    (b1,) = set1["results"]
    assert set(b1["stats"]) >= {
        "bytes_scanned",
        "bytes_read",
        "bytes_new",
        "bytes_stored",
        "dedup_ratio",
        "compression_ratio",
        "duration_s",
    }
    first_hash = sha(volume)
    with open(volume, "r+b") as f:
        f.seek(70_000)
        f.write(b"changed" * 100)
    (b2,) = json.loads(umbra("backup", str(volume), "-v", "vol", "--type", "incremental", "--json", env=env).stdout)[
        "results"
    ]
    assert b2["point"]["parent"] == b1["point"]["id"]
    listed = json.loads(umbra("list", "--json", env=env).stdout)
    assert [p["id"] for p in listed] == [b1["point"]["id"], b2["point"]["id"]]
    assert listed[0]["tags"] == ["a"]
    d = json.loads(umbra("diff", b1["point"]["id"][:8], "vol@latest", "--json", env=env).stdout)
    assert d["changed_bytes"] > 0 and all(r["offset"] <= 70_000 + 700 for r in d["ranges"])
    umbra("restore", b1["point"]["id"][:10], str(tmp_path / "out.img"), env=env)
    assert sha(tmp_path / "out.img") == first_hash
    t = b1["point"]["time"]
    umbra("restore", f"vol@{t}", str(tmp_path / "out2.img"), env=env)  # inclusive at the exact time
    assert sha(tmp_path / "out2.img") == first_hash
    c = json.loads(umbra("check", "--read-data", "--json", env=env).stdout)
    assert c["ok"] and c["points"] == 2
    pr = json.loads(umbra("prune", "--keep-last", "1", "--json", env=env).stdout)
    assert pr["removed"] == [b1["point"]["id"]]
    human = umbra("list", env=env).stdout
    assert b2["point"]["id"][:8] in human and "incremental" in human


def test_user_errors_are_one_line(env: dict[str, str], volume: Path, tmp_path: Path) -> None:
    one_line_error(umbra("list", env=env, ok=False), 11, "no umbra repository")
    umbra("init", env=env)
    one_line_error(umbra("init", env=env, ok=False), 12, "already exists")
    one_line_error(umbra("list", env={**env, "UMBRA_PASSWORD": "wrong"}, ok=False), 15, "wrong passphrase")
    no_pw = {k: v for k, v in env.items() if k != "UMBRA_PASSWORD"}
    proc = subprocess.run(
        [sys.executable, "-m", "umbra.cli.main", "list"],
        capture_output=True,
        text=True,
        env=no_pw,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    one_line_error(proc, 16, "UMBRA_PASSWORD")
    one_line_error(umbra("backup", str(tmp_path / "nope"), "-v", "x", env=env, ok=False), 30, "cannot read source")
    one_line_error(
        umbra("backup", str(volume), "-v", "x", "-t", "incremental", env=env, ok=False), 5, "full backup first"
    )
    one_line_error(umbra("restore", "vol@latest", str(tmp_path / "o"), env=env, ok=False), 23, "no point matches")
    one_line_error(umbra("restore", "not-hex!", str(tmp_path / "o"), env=env, ok=False), 5, "neither a point id")
    umbra("backup", str(volume), "-v", "vol", env=env)
    one_line_error(umbra("restore", "vol@latest", str(volume), env=env, ok=False), 32, "not empty")
    one_line_error(umbra("prune", env=env, ok=False), 5, "--keep-")
    one_line_error(umbra("restore", "vol@yesterday", str(tmp_path / "o"), env=env, ok=False), 5, "cannot read")
    assert umbra("backup", "--no-such-option", env=env, ok=False).returncode == 2  # usage error from the parser
    one_line_error(umbra("backup", env=env, ok=False), 5, "give SOURCES")


def test_password_file_and_command(env: dict[str, str], tmp_path: Path) -> None:
    umbra("init", env=env)
    (tmp_path / "pw").write_text("hunter2\n")
    base = {k: v for k, v in env.items() if k != "UMBRA_PASSWORD"}
    umbra("list", env={**base, "UMBRA_PASSWORD_FILE": str(tmp_path / "pw")})
    umbra("list", env={**base, "UMBRA_PASSWORD_COMMAND": "echo hunter2"})
    umbra("--password-file", str(tmp_path / "pw"), "list", env=base)
    umbra("--password-command", "echo hunter2", "list", env={**base, "UMBRA_PASSWORD": "wrong"})
    one_line_error(umbra("list", env={**base, "UMBRA_PASSWORD_COMMAND": "false"}, ok=False), 5, "COMMAND failed")


def test_locked_repository(env: dict[str, str], volume: Path) -> None:
    umbra("init", env=env)
    lock = Path(env["UMBRA_REPO"]) / "locks" / "00ff"
    lock.write_text(json.dumps({"exclusive": True, "host": "otherhost", "pid": 1, "refreshed": 4e9}))
    one_line_error(
        umbra("backup", str(volume), "-v", "v", env=env, ok=False), 13, "locked by exclusive lock of pid 1 on otherhost"
    )


def test_keys_commands(env: dict[str, str]) -> None:
    umbra("init", env=env)
    umbra("key", "add", "--label", "second", env={**env, "UMBRA_NEW_PASSWORD": "other"})
    keys = json.loads(umbra("key", "list", "--json", env=env).stdout)
    assert len(keys) == 2 and sum(k["current"] for k in keys) == 1
    umbra("list", env={**env, "UMBRA_PASSWORD": "other"})
    other = next(k for k in keys if k["label"] == "second")
    umbra("key", "remove", other["id"], env=env)
    one_line_error(umbra("list", env={**env, "UMBRA_PASSWORD": "other"}, ok=False), 15, "wrong passphrase")
    umbra("key", "passwd", env={**env, "UMBRA_NEW_PASSWORD": "third"})
    umbra("list", env={**env, "UMBRA_PASSWORD": "third"})


def test_unencrypted_repository_needs_no_passphrase(tmp_path: Path, volume: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "UMBRA_PASSWORD"}
    env["UMBRA_REPO"] = str(tmp_path / "plain")
    umbra("init", "--encryption", "none", "--block-size", "4K", env=env)
    umbra("backup", str(volume), "-v", "v", env=env)
    umbra("check", "--read-data", env=env)


def test_check_exit_codes(env: dict[str, str], volume: Path) -> None:
    umbra("init", env=env)
    umbra("backup", str(volume), "-v", "v", env=env)
    packs = sorted((Path(env["UMBRA_REPO"]) / "data").rglob("*"))
    pack = next(p for p in packs if p.is_file())
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 1
    pack.write_bytes(bytes(data))
    assert umbra("check", env=env).returncode == 0  # structure is fine
    proc = umbra("check", "--read-data", env=env, ok=False)
    assert proc.returncode == 22 and "error:" in proc.stderr and "Traceback" not in proc.stderr
