"""`edif audit verify|export|erase` on a broker data dir."""

from __future__ import annotations

import json
import sqlite3

import pytest
from click.testing import CliRunner

from broker.audit import AuditAction, AuditEvent, open_audit_log
from edif.cli import main

ALICE = "alice@uni-example.eu"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDIF_HOME", str(tmp_path))
    monkeypatch.delenv("EDIF_BROKER_DATA_DIR", raising=False)
    log = open_audit_log(tmp_path / "broker", tmp_path / "keys", None)
    for user in (ALICE, "bob@example.org"):
        log.append(AuditEvent(action=AuditAction.JOB_SUBMIT, user=user, role="researcher",
                              model="edif-demo/tiny-gpt2", bytes_in=10))  # fmt: skip
    log.close()
    return tmp_path


def run(*args: str):
    return CliRunner().invoke(main, ["audit", *args], catch_exceptions=False)


def test_verify_lists_entries_and_passes(home) -> None:
    result = run("verify")
    assert result.exit_code == 0, result.output
    assert "audit log OK: 2 entries" in result.output
    assert "edif-demo/tiny-gpt2" in result.output


def test_verify_fails_naming_the_entry(home) -> None:
    db = sqlite3.connect(home / "broker" / "audit" / "audit.db")
    with db:
        db.execute("UPDATE entries SET body = replace(body, 'tiny-gpt2', 'tiny-gpt3') WHERE seq=1")
    result = run("verify", "--data-dir", str(home / "broker"))
    assert result.exit_code == 1
    assert "TAMPERED: entry 1" in result.output


def test_verify_without_a_log_is_an_error(tmp_path) -> None:
    result = run("verify", "--data-dir", str(tmp_path / "nothing"))
    assert result.exit_code == 1 and "no audit log" in result.output


def test_export_erase_round_trip(home) -> None:
    exported = json.loads(run("export", "--user", ALICE).output)
    assert len(exported["entries"]) == 1 and ALICE not in json.dumps(exported)
    csv = run("export", "--format", "csv", "--since", "1d").output
    assert len(csv.strip().splitlines()) == 3
    erased = json.loads(run("erase", "--user", ALICE, "--yes").output)
    assert erased["entries"] == 1
    assert json.loads(run("export", "--user", ALICE).output)["entries"] == []
    assert run("verify").exit_code == 0
