"""KeyStore: key files on disk, kid derivation, concurrent creation and the JWKS round trip."""

from __future__ import annotations

import hashlib
import multiprocessing
import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from auth.keys import KeyStore, kid_of, public_keys_from_jwks
from edif.errors import ConfigError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _raw(key) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_first_use_creates_one_private_key(tmp_path):
    store = KeyStore(tmp_path / "keys")
    kid, key = store.signing_key()

    assert isinstance(key, Ed25519PrivateKey)
    assert kid == hashlib.sha256(_raw(key.public_key())).hexdigest()[:16]
    assert _mode(tmp_path / "keys") == 0o700
    pem = tmp_path / "keys" / f"{kid}.pem"
    assert _mode(pem) == 0o600
    assert pem.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8
    assert [p.name for p in (tmp_path / "keys").glob("*.pem")] == [pem.name]


def test_signing_key_is_stable_across_instances(tmp_path):
    kid, _ = KeyStore(tmp_path).signing_key()
    assert KeyStore(tmp_path).signing_key()[0] == kid
    assert KeyStore(tmp_path).kids() == [kid]


def test_reading_never_creates(tmp_path):
    store = KeyStore(tmp_path / "missing")
    assert store.public_keys() == {}
    assert store.jwks() == {"keys": []}
    assert not (tmp_path / "missing").exists()


def test_loose_existing_directory_is_tightened(tmp_path):
    directory = tmp_path / "keys"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    KeyStore(directory).signing_key()
    assert _mode(directory) == 0o700


def _write_key(directory: Path) -> str:
    key = Ed25519PrivateKey.generate()
    kid = kid_of(key.public_key())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (directory / f"{kid}.pem").write_bytes(pem)
    return kid


def test_several_keys_all_verify_and_the_first_kid_signs(tmp_path):
    kids = sorted(_write_key(tmp_path) for _ in range(3))
    store = KeyStore(tmp_path)
    assert store.signing_key()[0] == kids[0]
    assert sorted(store.public_keys()) == kids


def test_renamed_key_file_is_a_config_error(tmp_path):
    kid = _write_key(tmp_path)
    (tmp_path / f"{kid}.pem").rename(tmp_path / "0000000000000000.pem")
    with pytest.raises(ConfigError, match="does not match its kid"):
        KeyStore(tmp_path).public_keys()


def _kid_in_child(directory: str, start: multiprocessing.synchronize.Event, out) -> None:
    start.wait()
    out.put(KeyStore(Path(directory)).signing_key()[0])


def test_concurrent_first_use_makes_exactly_one_key(tmp_path):
    # Processes (fork) and threads both race on the empty folder; one key must come out.
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_kid_in_child, args=(str(tmp_path), start, out)) for _ in range(4)]
    for p in procs:
        p.start()
    barrier = threading.Barrier(4)
    kids: list[str] = []

    def in_thread() -> None:
        barrier.wait()
        kids.append(KeyStore(tmp_path).signing_key()[0])

    threads = [threading.Thread(target=in_thread) for _ in range(4)]
    start.set()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    kids += [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)

    assert len(set(kids)) == 1
    assert KeyStore(tmp_path).kids() == kids[:1]


def test_jwks_is_rfc8037_and_round_trips(tmp_path):
    store = KeyStore(tmp_path)
    kid, key = store.signing_key()
    jwks = store.jwks()

    assert jwks["keys"] == [
        {"kty": "OKP", "crv": "Ed25519", "x": jwks["keys"][0]["x"], "kid": kid}
        | {"alg": "EdDSA", "use": "sig"}
    ]
    assert "=" not in jwks["keys"][0]["x"]
    keys = public_keys_from_jwks(jwks)
    assert list(keys) == [kid]
    assert _raw(keys[kid]) == _raw(key.public_key())


@pytest.mark.parametrize(
    "change",
    [
        {"kty": "RSA"},
        {"kty": "EC", "crv": "P-256"},
        {"crv": "X25519"},
        {"alg": "HS256"},
        {"use": "enc"},
        {"x": "not base64!"},
        {"x": "AAAA"},
        {"kid": "0000000000000000"},
    ],
)
def test_jwks_rejects_anything_but_ed25519_signing_keys(tmp_path, change):
    store = KeyStore(tmp_path)
    store.signing_key()
    entry = store.jwks()["keys"][0] | change
    with pytest.raises(ConfigError):
        public_keys_from_jwks({"keys": [entry]})


@pytest.mark.parametrize("document", [{}, {"keys": "x"}, [], {"keys": ["x"]}])
def test_jwks_must_be_a_key_list(document):
    with pytest.raises(ConfigError):
        public_keys_from_jwks(document)


def test_default_store_lives_under_edif_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDIF_HOME", str(tmp_path))
    assert KeyStore.default().directory == tmp_path / "keys"


# -- rotation in the store: records in keys.json, several processes, crashes -----------------

DAY = 86400.0


def _token(store: KeyStore, clock) -> str:
    from auth.roles import Role
    from auth.tokens import TokenIssuer

    return TokenIssuer(store, clock=clock).issue("alice", Role.RESEARCHER, 30 * 86400)


def test_rotation_is_seen_by_another_instance_without_restart(tmp_path):
    from auth.tokens import TokenVerifier
    from edif.clock import FakeClock
    from edif.errors import AuthenticationError

    clock = FakeClock()
    cli, broker = KeyStore(tmp_path, clock), KeyStore(tmp_path, clock)  # two "processes"
    verifier = TokenVerifier(broker, clock=clock)
    old_kid = cli.signing_key()[0]
    old_token = _token(cli, clock)
    assert verifier.verify(old_token).sub == "alice"

    new_kid = cli.rotate(grace_s=DAY)

    assert broker.signing_key()[0] == new_kid != old_kid
    assert [k["kid"] for k in broker.jwks()["keys"]] == sorted([old_kid, new_kid])
    assert verifier.verify(old_token).sub == "alice"  # grace
    assert verifier.verify(_token(broker, clock)).sub == "alice"
    clock.advance(DAY)
    assert [k["kid"] for k in broker.jwks()["keys"]] == [new_kid]
    with pytest.raises(AuthenticationError, match="retired at .* grace period is over"):
        verifier.verify(old_token)


def test_records_are_durable_and_private(tmp_path):
    import json as _json

    store = KeyStore(tmp_path)
    first = store.signing_key()[0]
    second = store.rotate(grace_s=60)
    meta = tmp_path / "keys.json"
    assert _mode(meta) == 0o600
    document = _json.loads(meta.read_text())
    assert {entry["kid"] for entry in document["keys"]} == {first, second}
    assert not list(tmp_path.glob(".*.tmp"))  # no temp files left behind
    assert KeyStore(tmp_path).signing_key()[0] == second


def test_a_legacy_folder_is_adopted_by_its_first_rotation(tmp_path):
    from auth.rotation import KeyState

    legacy = sorted(_write_key(tmp_path) for _ in range(2))
    store = KeyStore(tmp_path)
    assert store.signing_key()[0] == legacy[0]  # the old rule, before keys.json exists
    assert not (tmp_path / "keys.json").exists()
    new = store.rotate(grace_s=60)
    assert store.states() == {
        legacy[0]: KeyState.GRACE,
        legacy[1]: KeyState.GRACE,
        new: KeyState.ACTIVE,
    }


def test_a_key_file_without_record_is_ignored(tmp_path):
    # What a crash between writing the PEM and committing keys.json leaves behind.
    store = KeyStore(tmp_path)
    kid = store.signing_key()[0]
    orphan = _write_key(tmp_path)
    assert store.untracked() == [orphan]
    assert list(store.public_keys()) == [kid]
    assert store.signing_key()[0] == kid


def test_retiring_the_signing_key_rotates_first(tmp_path):
    from auth.rotation import KeyState

    store = KeyStore(tmp_path)
    leaked = store.signing_key()[0]
    new = store.retire(leaked, grace_s=DAY)
    assert new is not None and store.signing_key()[0] == new
    assert store.states()[leaked] is KeyState.RETIRED
    assert list(store.public_keys()) == [new]


def test_retiring_an_unknown_kid_is_not_found(tmp_path):
    from edif.errors import NotFound

    store = KeyStore(tmp_path)
    store.signing_key()
    with pytest.raises(NotFound, match="edif key list"):
        store.retire("0123456789abcdef")


def test_damaged_records_are_a_config_error(tmp_path):
    store = KeyStore(tmp_path)
    store.signing_key()
    (tmp_path / "keys.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read key records"):
        KeyStore(tmp_path).public_keys()


def _rotate_in_child(directory: str, start: multiprocessing.synchronize.Event, out) -> None:
    start.wait()
    out.put(KeyStore(Path(directory)).rotate(grace_s=DAY))


def test_concurrent_rotations_lose_no_key(tmp_path):
    # Four processes rotate at once; the lock serialises them: every new key is recorded.
    first = KeyStore(tmp_path).signing_key()[0]
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_rotate_in_child, args=(str(tmp_path), start, out)) for _ in range(4)
    ]
    for p in procs:
        p.start()
    start.set()
    new = {out.get(timeout=30) for _ in procs}
    for p in procs:
        p.join(timeout=30)
    store = KeyStore(tmp_path)
    assert set(store.records()) == new | {first}
    assert store.signing_key()[0] in new
    assert set(store.public_keys()) == new | {first}
