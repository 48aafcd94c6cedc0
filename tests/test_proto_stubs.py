"""The committed gRPC stubs match what `make proto` generates from proto/*.proto today."""

from __future__ import annotations

from pathlib import Path

from edif.protogen import PROTO_DIR, generate


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    generated = generate(tmp_path)
    assert {p.name for p in generated} >= {
        "site_agent_pb2.py",
        "site_agent_pb2.pyi",
        "site_agent_pb2_grpc.py",
    }
    stale = [p.name for p in generated if p.read_bytes() != (PROTO_DIR / p.name).read_bytes()]
    assert not stale, f"stubs out of date, run `make proto`: {stale}"


def test_stubs_import_as_package_modules() -> None:
    from proto import site_agent_pb2, site_agent_pb2_grpc

    assert site_agent_pb2.DESCRIPTOR.package == "edif.v1"
    assert hasattr(site_agent_pb2_grpc, "SiteAgentStub")
