"""The audit log against the real mesh: a job leaves verifiable, pseudonymous entries.

A researcher runs one job with the real nnsight client; `edif audit verify` (a subprocess on
the broker's data dir, `<home>/run/broker`) passes and lists the job's entries; neither the
user id nor the token is in the audit store or the broker's log; a tampered copy of the
database fails verification naming the entry.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys

import pytest
from nnsight import CONFIG
from nnsight.intervention.backends.remote import RemoteError

from edif.demo import TINY_GPT2, load

pytestmark = pytest.mark.e2e

SUB = "audit-subject@uni-example.eu"


def edif_audit(mesh, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "EDIF_HOME": str(mesh.home),
        "EDIF_BROKER_DATA_DIR": str(mesh.home / "run" / "broker"),
    }
    return subprocess.run(
        [sys.executable, "-m", "edif", "audit", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def job(mesh) -> str:
    """Run one job (completes) and one that raises (ERROR) as SUB; returns the token used."""
    token = mesh.token(sub=SUB)
    CONFIG.API.HOST = mesh.url
    CONFIG.API.APIKEY = token
    CONFIG.API.COMPRESS = True
    model = load(TINY_GPT2, home=mesh.home)
    try:
        with model.trace("The capital of France is", remote=True):
            logits = model.lm_head.output.save()
        assert logits.shape[-1] == 400
        with pytest.raises(RemoteError):
            with model.trace("The capital of France is", remote=True):
                model.transformer.h[9].output.save()
    finally:
        CONFIG.API.APIKEY = mesh.token()
    return token


def test_verify_passes_and_shows_the_job(mesh, job) -> None:
    result = edif_audit(mesh, "verify")
    assert result.returncode == 0, result.stderr
    assert "audit log OK" in result.stdout
    lines = [line for line in result.stdout.splitlines() if "tiny-gpt2" in line]
    assert any("job.submit" in line for line in lines)
    assert any("job.complete" in line and "site=" in line for line in lines)
    assert any("job.error" in line and "site=" in line for line in lines)


def test_the_subject_can_export_their_entries(mesh, job) -> None:
    result = edif_audit(mesh, "export", "--user", SUB)
    assert result.returncode == 0, result.stderr
    exported = json.loads(result.stdout)
    actions = {entry["action"] for entry in exported["entries"]}
    assert {"job.submit", "job.complete", "job.error"} <= actions
    ended = next(e for e in exported["entries"] if e["action"] == "job.complete")
    assert ended["bytes_in"] > 0 and ended["site"] and ended["pseudonym"].startswith("a-")


def test_no_user_id_or_token_in_the_store_or_the_broker_log(mesh, job) -> None:
    audit_dir = mesh.home / "run" / "broker" / "audit"
    stored = b"".join(p.read_bytes() for p in audit_dir.iterdir() if p.is_file())
    log = mesh.log("broker")
    for secret in (SUB, job, job.split(".")[2]):
        assert secret.encode() not in stored
        assert secret not in log


def test_a_tampered_copy_fails_naming_the_entry(mesh, job, tmp_path) -> None:
    live = mesh.home / "run" / "broker" / "audit"
    copy = tmp_path / "broker" / "audit"
    copy.mkdir(parents=True)
    shutil.copy(live / "head.json", copy / "head.json")  # first: the database is at least as new
    source = sqlite3.connect(live / "audit.db")
    target = sqlite3.connect(copy / "audit.db")
    source.backup(target)  # a consistent snapshot, WAL included
    source.close()
    head = json.loads((copy / "head.json").read_text())["seq"]
    target.execute("DELETE FROM entries WHERE seq > ?", (head,))  # the snapshot's own head
    (seq,) = target.execute(
        "SELECT max(seq) FROM entries WHERE json_extract(body, '$.action') = 'job.submit'"
    ).fetchone()
    target.execute(
        "UPDATE entries SET body = json_set(body, '$.bytes_in', 1) WHERE seq = ?", (seq,)
    )
    target.commit()
    target.close()
    assert edif_audit(mesh, "verify", "--data-dir", str(tmp_path / "broker")).returncode == 1
    result = edif_audit(mesh, "verify", "--quiet", "--data-dir", str(tmp_path / "broker"))
    assert result.returncode == 1
    assert f"entry {seq}" in result.stderr and "edited" in result.stderr
