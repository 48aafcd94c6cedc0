"""Pseudonymizer: stable keyed pseudonyms and the key file behind them."""

from __future__ import annotations

import hashlib
import hmac
import re
import stat

import pytest

from auth.pseudonym import KEY_FILE, Pseudonymizer
from edif.errors import ConfigError


def test_pseudonym_is_keyed_hmac_prefix():
    key = b"k" * 32
    expected = "u-" + hmac.new(key, b"alice", hashlib.sha256).hexdigest()[:16]
    assert Pseudonymizer(key)("alice") == expected
    assert re.fullmatch(r"u-[0-9a-f]{16}", expected)


def test_stable_per_key_and_distinct_across_users_and_keys():
    a, b = Pseudonymizer(b"a" * 32), Pseudonymizer(b"b" * 32)
    assert a("alice") == a("alice")
    assert a("alice") != a("bob")
    assert a("alice") != b("alice")
    assert "alice" not in a("alice")


def test_short_key_is_refused():
    with pytest.raises(ConfigError):
        Pseudonymizer(b"short")


def test_repr_hides_the_key():
    assert "k" * 8 not in repr(Pseudonymizer(b"k" * 32))


def test_from_home_creates_a_private_key_once(tmp_path):
    directory = tmp_path / "keys"
    first = Pseudonymizer.from_home(directory)
    path = directory / KEY_FILE

    assert len(path.read_bytes()) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert Pseudonymizer.from_home(directory)("alice") == first("alice")


def test_from_home_defaults_to_edif_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDIF_HOME", str(tmp_path))
    Pseudonymizer.from_home()
    assert (tmp_path / "keys" / KEY_FILE).exists()


def test_corrupt_key_file_is_a_config_error(tmp_path):
    (tmp_path / KEY_FILE).write_bytes(b"too short")
    with pytest.raises(ConfigError, match="32 bytes"):
        Pseudonymizer.from_home(tmp_path)
