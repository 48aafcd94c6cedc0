"""`edif token issue` / `edif token jwks`: stdout carries only the result; bad input exits 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from auth.keys import KeyStore, public_keys_from_jwks
from auth.roles import Role
from auth.tokens import TokenVerifier
from edif.cli import main, parse_duration

JWT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("EDIF_HOME", str(tmp_path))
    return tmp_path


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def _verify(home: Path, token: str, audience: str = "edif-broker"):
    return TokenVerifier(KeyStore(home / "keys"), audience=audience).verify(token)


def test_issue_prints_only_the_token(home):
    result = _run("token", "issue", "--sub", "alice", "--role", "researcher", "--group", "lab-a")
    assert result.exit_code == 0, result.output
    assert JWT.fullmatch(result.stdout.rstrip("\n"))
    assert result.stdout.count("\n") == 1
    claims = _verify(home, result.stdout.strip())
    assert (claims.sub, claims.role, claims.groups) == ("alice", Role.RESEARCHER, ["lab-a"])
    assert claims.exp - claims.iat == 30 * 86400  # default --ttl 30d


def test_issue_with_every_option(home):
    args = ["--sub", "agent-1", "--role", "site", "--site", "erlangen", "--ttl", "12h"]
    args += ["--group", "g1", "--group", "g2", "--audience", "edif-site"]
    result = _run("token", "issue", *args)
    assert result.exit_code == 0, result.output
    claims = _verify(home, result.stdout.strip(), audience="edif-site")
    assert (claims.site, claims.groups, claims.exp - claims.iat) == (
        "erlangen",
        ["g1", "g2"],
        43200,
    )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("3600", 3600), ("90s", 90), ("15m", 900), ("12h", 43200), ("30d", 2592000), (" 2H ", 7200)],
)
def test_ttl_forms(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--role", "researcher", "--ttl", "soon"], "'soon' is not a duration"),
        (["--role", "researcher", "--ttl", "0"], "is not a duration"),
        (["--role", "researcher", "--ttl", "-5m"], "is not a duration"),
        (["--role", "root"], "'root' is not one of"),
        (["--role", "site"], "--role site needs --site"),
    ],
)
def test_bad_input_is_a_usage_error(home, args, message):
    result = _run("token", "issue", "--sub", "alice", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_jwks_verifies_issued_tokens(home):
    token = _run("token", "issue", "--sub", "alice", "--role", "admin").stdout.strip()
    result = _run("token", "jwks")
    assert result.exit_code == 0, result.output
    keys = public_keys_from_jwks(json.loads(result.stdout))
    assert TokenVerifier(keys).verify(token).role == Role.ADMIN


def test_jwks_on_a_fresh_home_has_the_signing_key(home):
    document = json.loads(_run("token", "jwks").stdout)
    assert [k["kid"] for k in document["keys"]] == KeyStore(home / "keys").kids()


def test_installed_entry_point_prints_one_jwt_line(tmp_path):
    edif = Path(sys.executable).parent / "edif"
    env = {**os.environ, "EDIF_HOME": str(tmp_path)}
    proc = subprocess.run(
        [str(edif), "token", "issue", "--sub", "alice", "--role", "researcher", "--ttl", "15m"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    assert lines[1:] == [""] and JWT.fullmatch(lines[0])
    assert _verify(tmp_path, lines[0]).sub == "alice"


def test_list_shows_pseudonyms_and_revoke_marks_the_token(tmp_path, monkeypatch) -> None:
    from click.testing import CliRunner

    from edif.cli import main as cli

    monkeypatch.setenv("EDIF_HOME", str(tmp_path))
    runner = CliRunner()
    token = runner.invoke(
        cli, ["token", "issue", "--sub", "carol@example.org", "--role", "researcher"]
    ).output.strip()
    listing = runner.invoke(cli, ["token", "list"]).output
    assert "carol@example.org" not in listing and "valid" in listing
    assert token not in listing
    result = runner.invoke(cli, ["token", "revoke", "--token", token])
    assert result.exit_code == 0, result.output
    assert "revoked" in runner.invoke(cli, ["token", "list"]).output
    assert runner.invoke(cli, ["token", "revoke"]).exit_code == 2


# -- edif key rotate | list | retire -----------------------------------------------------------


def test_key_rotate_switches_the_signing_key_and_keeps_the_old_one_in_grace(home, monkeypatch):
    monkeypatch.setenv("EDIF_BROKER_KEY_GRACE_S", "3600")
    old_token = _run("token", "issue", "--sub", "alice", "--role", "researcher").stdout.strip()
    old_kid = KeyStore(home / "keys").kids()[0]

    result = _run("key", "rotate")
    assert result.exit_code == 0, result.output
    new_kid = result.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{16}", new_kid) and new_kid != old_kid
    assert "3600s" in result.stderr

    new_token = _run("token", "issue", "--sub", "bob", "--role", "researcher").stdout.strip()
    assert _verify(home, old_token).sub == "alice"  # grace
    assert _verify(home, new_token).sub == "bob"
    assert pyjwt_kid(new_token) == new_kid

    listing = _run("key", "list").stdout.splitlines()
    assert listing[0].split()[:2] == ["kid", "created"]
    rows = {line.split()[0]: line for line in listing[1:]}
    assert " active " in rows[new_kid] + " "
    assert " grace " in rows[old_kid]


def test_key_rotate_with_zero_grace_and_emergency_retire(home):
    from edif.errors import AuthenticationError

    token = _run("token", "issue", "--sub", "alice", "--role", "researcher").stdout.strip()
    first = KeyStore(home / "keys").kids()[0]
    second = _run("key", "rotate", "--grace", "1h").stdout.strip()

    result = _run("key", "retire", first, "--yes")
    assert result.exit_code == 0, result.output
    with pytest.raises(AuthenticationError, match="retired"):
        _verify(home, token)
    assert "retired" in _run("key", "list").stdout.split(first)[1].splitlines()[0]

    # retiring the signing key rotates to a fresh one first
    result = _run("key", "retire", second, "--yes")
    assert "new tokens are signed by" in result.stderr
    assert KeyStore(home / "keys").signing_key()[0] not in (first, second)


def test_key_retire_unknown_kid_and_bad_grace(home):
    _run("key", "rotate")
    result = _run("key", "retire", "0123456789abcdef", "--yes")
    assert result.exit_code == 1 and "no key" in result.output
    assert _run("key", "rotate", "--grace", "soon").exit_code == 2


def test_key_retire_asks_first(home):
    kid = _run("key", "rotate").stdout.strip()
    result = CliRunner().invoke(main, ["key", "retire", kid], input="n\n")
    assert result.exit_code == 1  # aborted
    assert KeyStore(home / "keys").signing_key()[0] == kid


def pyjwt_kid(token: str) -> str:
    import jwt

    return jwt.get_unverified_header(token)["kid"]
