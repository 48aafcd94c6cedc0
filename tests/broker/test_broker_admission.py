"""Admission policies: version gate, envelope, size, role."""

from __future__ import annotations

import pytest

from broker import admission
from edif.errors import BadRequest, ClientVersionError, PayloadTooLarge, PermissionDenied


def test_version_gate_message_tells_what_to_install() -> None:
    assert admission.check_client_version("0.8.1", {"0.8.1"}) == "0.8.1"
    with pytest.raises(ClientVersionError) as caught:
        admission.check_client_version("0.7.0", {"0.8.1"})
    assert caught.value.http_status == 426
    assert caught.value.message == (
        "nnsight 0.7.0 is not served here; sites run nnsight 0.8.1: pip install nnsight==0.8.1"
    )


def test_version_gate_suggests_the_newest_and_handles_missing_versions() -> None:
    with pytest.raises(ClientVersionError, match=r"pip install nnsight==0\.10\.0"):
        admission.check_client_version("0.7.0", {"0.9.2", "0.10.0"})
    with pytest.raises(ClientVersionError, match="without a reported nnsight version"):
        admission.check_client_version("", {"0.8.1"})
    with pytest.raises(ClientVersionError):
        admission.check_client_version(None, {"0.8.1"})
    assert admission.check_client_version("0.7.0", set()) == "0.7.0"  # no site known yet


def test_envelope_parsing() -> None:
    envelope = admission.parse_envelope(
        '{"model_key":"a.B:x","session_id":"s","compress":true,"env":{"k":1},"extra":0}'
    )
    assert (envelope.model_key, envelope.session_id, envelope.compress) == ("a.B:x", "s", True)
    assert admission.env_json(envelope) == '{"k":1}'
    for raw in [
        "",
        "not json",
        "[]",
        '{"session_id":"s"}',
        '{"model_key":1}',
        '{"model_key":"k","env":[]}',
    ]:
        with pytest.raises(BadRequest, match="envelope is invalid"):
            admission.parse_envelope(raw)
    with pytest.raises(BadRequest, match="env is larger"):
        admission.parse_envelope('{"model_key":"k","env":{"a":"' + "x" * 70000 + '"}}')


def test_payload_size_and_role() -> None:
    admission.check_payload_size(10, 10)
    with pytest.raises(PayloadTooLarge):
        admission.check_payload_size(11, 10)
    with pytest.raises(BadRequest):
        admission.check_payload_size(0, 10)
    admission.check_role("researcher")
    for role in ("site", "broker", "nobody"):
        with pytest.raises(PermissionDenied):
            admission.check_role(role)
