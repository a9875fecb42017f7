"""Jobs files: a named job runs a whole snapshot-set backup, and its retention drives prune."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from umbra.engine.jobs import load_job
from umbra.errors import UsageError

JOBS = """
[defaults]
commit_timeout = 5

[job.images]
sources = ["{a}", "{b}"]
volumes = ["alpha", "beta"]
tags = ["nightly"]
pre_snapshot = "echo pre >> {log}"
post_backup = "echo post $UMBRA_STATUS >> {log}"

[job.images.retention]
keep_last = 1

[job.broken]
sources = ["{a}"]
colour = "blue"
"""


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(random.Random(1).randbytes(300_000))
    b.write_bytes(random.Random(2).randbytes(300_000))
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(JOBS.format(a=a, b=b, log=tmp_path / "log"))
    env = {**os.environ, "UMBRA_REPO": str(tmp_path / "repo"), "UMBRA_PASSWORD": "pw", "UMBRA_JOBS": str(jobs)}
    subprocess.run([sys.executable, "-m", "umbra.cli.main", "init"], env=env, check=True, capture_output=True)
    return tmp_path, env


def umbra(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "umbra.cli.main", *args], env=env, capture_output=True, text=True, check=False
    )


def test_job_backup_and_prune(setup: tuple[Path, dict[str, str]]) -> None:
    tmp_path, env = setup
    for _ in range(2):
        proc = umbra(env, "backup", "--job", "images", "--json")
        assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert [r["point"]["volume"] for r in doc["results"]] == ["alpha", "beta"]
    assert doc["results"][0]["point"]["tags"] == ["nightly"] and doc["consistency"] == "application-consistent"
    assert (tmp_path / "log").read_text().split("\n")[:2] == ["pre", "post ok"]
    other = umbra(env, "backup", str(tmp_path / "a.img"), "-v", "untouched")
    assert other.returncode == 0, other.stderr
    pr = json.loads(umbra(env, "prune", "--job", "images", "--json").stdout)
    assert len(pr["removed"]) == 2 and len(pr["kept"]) == 3
    listed = json.loads(umbra(env, "list", "--json").stdout)
    assert sorted(p["volume"] for p in listed) == ["alpha", "beta", "untouched"]


def test_job_errors(setup: tuple[Path, dict[str, str]]) -> None:
    tmp_path, env = setup
    with pytest.raises(UsageError, match="unknown key"):
        load_job("broken", env["UMBRA_JOBS"])
    with pytest.raises(UsageError, match="no job 'nope'"):
        load_job("nope", env["UMBRA_JOBS"])
    with pytest.raises(UsageError, match="no jobs file"):
        load_job("images", str(tmp_path / "missing.toml"))
    proc = umbra(env, "backup", "--job", "nope")
    assert proc.returncode == 5 and proc.stderr.count("\n") == 1


def test_job_retention_takes_a_duration(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('[job.x]\nsources = ["/dev/null"]\n[job.x.retention]\nkeep_within = "30d"\nkeep_last = 2\n')
    policy = load_job("x", str(jobs)).retention
    assert policy is not None and policy.keep_within == 30 * 86400 and policy.keep_last == 2
    jobs.write_text('[job.x]\nsources = ["/dev/null"]\n[job.x.retention]\nkeep_within = "soon"\n')
    with pytest.raises(UsageError, match="duration"):
        load_job("x", str(jobs))
