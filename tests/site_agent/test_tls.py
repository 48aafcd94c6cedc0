"""TLS between the broker's gRPC client and an agent: pinned certificate, CA bundle, mTLS, and
clear failures (wrong CA, plaintext to a TLS agent).

Certificates are made here with `cryptography`: a test CA, a server certificate for
`site.test` and 127.0.0.1, a second unrelated CA, and a client certificate for mTLS.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from auth.keys import KeyStore
from auth.roles import Role
from auth.tokens import TokenIssuer
from broker.credentials import CachedSiteCredentials
from broker.site_tls import SiteTlsPins, TlsOffer
from broker.sites import GrpcSiteClient
from edif.clock import SystemClock
from edif.errors import ConfigError, SiteUnavailable
from proto import site_agent_pb2 as pb
from registry.consul import ConsulCatalog, ConsulSettings, grpc_check_id
from registry.consul_fake import FakeConsul
from registry.model import Hardware, SiteRecord, Versions
from site_agent.config import SiteConfig, TlsConfig
from site_agent.executor import JobSpec
from site_agent.main import bind, broker_verifier
from site_agent.servicer import build_server

SITE = "tls-site"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(ca: tuple, cn: str) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) for `cn` and 127.0.0.1, signed by `ca`."""
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names = [x509.DNSName(cn), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return _pem(key), cert.public_bytes(serialization.Encoding.PEM)


def ca_pem(ca: tuple) -> bytes:
    return ca[1].public_bytes(serialization.Encoding.PEM)


class FakeExecutor:
    def describe(self) -> pb.SiteDescription:
        return pb.SiteDescription(site=SITE, capacity=1)

    async def execute(self, job: JobSpec) -> AsyncIterator[pb.ExecuteUpdate]:
        yield pb.ExecuteUpdate(chunk=pb.ResultChunk(data=job.payload[::-1]))
        yield pb.ExecuteUpdate(done=pb.ResultEnd(total_bytes=len(job.payload)))

    async def cancel(self, job_id: str) -> bool:
        return False


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pki")
    ca, other = make_ca("eDIF test CA"), make_ca("someone else's CA")
    files = {}
    for name, data in {
        "ca.pem": ca_pem(ca),
        "other-ca.pem": ca_pem(other),
        **dict(zip(("server.key", "server.pem"), issue(ca, "site.test"), strict=True)),
        **dict(zip(("client.key", "client.pem"), issue(ca, "edif-broker"), strict=True)),
    }.items():
        (folder / name).write_bytes(data)
        files[name] = folder / name
    return files


@pytest.fixture
def keys(tmp_path) -> KeyStore:
    store = KeyStore(tmp_path / "keys")
    store.signing_key()
    return store


async def start_agent(keys: KeyStore, tls: TlsConfig | None):
    cfg = SiteConfig(site=SITE, models=[{"repo_id": "edif-demo/tiny-gpt2"}])
    server, _ = build_server(FakeExecutor(), broker_verifier(cfg, keys.jwks()), [])
    port = bind(server, "127.0.0.1:0", tls)
    await server.start()
    return server, f"127.0.0.1:{port}"


def client_for(keys: KeyStore, address: str, pins: SiteTlsPins | None) -> GrpcSiteClient:
    creds = CachedSiteCredentials(TokenIssuer(keys), Role.BROKER, SystemClock())
    return GrpcSiteClient({SITE: address}, creds, describe_timeout_s=5.0, tls=pins)


def pinned(tmp_path: Path, trust: Path, server_name: str | None = None, **mtls) -> SiteTlsPins:
    pins = SiteTlsPins(tmp_path / "pins", **mtls)
    pins.record(SITE, TlsOffer(trust_pem=trust.read_text(), server_name=server_name))
    return pins


async def describe_and_execute(client: GrpcSiteClient) -> None:
    assert (await client.describe(SITE)).site == SITE
    request = pb.ExecuteRequest(job_id="j1", model_key="k", payload=b"abc")
    updates = [u async for u in client.execute(SITE, request)]
    assert updates[0].chunk.data == b"cba" and updates[-1].HasField("done")


@pytest.mark.parametrize("trust", ["ca.pem", "server.pem"])  # the issuing CA, or the leaf
async def test_describe_and_execute_over_tls_with_the_pinned_certificate(
    tmp_path, keys, pki, trust
) -> None:
    tls = TlsConfig(cert=pki["server.pem"], key=pki["server.key"])
    server, address = await start_agent(keys, tls)
    client = client_for(keys, address, pinned(tmp_path, pki[trust]))
    try:
        await describe_and_execute(client)
    finally:
        await client.close()
        await server.stop(None)


async def test_broker_ca_bundle_and_server_name_override(tmp_path, keys, pki) -> None:
    tls = TlsConfig(cert=pki["server.pem"], key=pki["server.key"])
    server, address = await start_agent(keys, tls)
    # The site pinned an unrelated certificate, but the broker's own CA bundle wins; the site
    # is called by address and checked under the name its certificate carries.
    pins = pinned(tmp_path, pki["other-ca.pem"], "site.test", ca_file=pki["ca.pem"])
    client = client_for(keys, address.replace("127.0.0.1", "localhost"), pins)
    try:
        await describe_and_execute(client)
    finally:
        await client.close()
        await server.stop(None)


async def test_wrong_ca_fails_clearly(tmp_path, keys, pki) -> None:
    tls = TlsConfig(cert=pki["server.pem"], key=pki["server.key"])
    server, address = await start_agent(keys, tls)
    client = client_for(keys, address, pinned(tmp_path, pki["other-ca.pem"]))
    try:
        with pytest.raises(SiteUnavailable) as caught:
            await client.describe(SITE)
        assert caught.value.message == (
            f"Site {SITE}'s TLS certificate did not verify against "
            "the certificate pinned when it joined."
        )
    finally:
        await client.close()
        await server.stop(None)


async def test_plaintext_to_a_tls_agent_fails_clearly(keys, pki) -> None:
    tls = TlsConfig(cert=pki["server.pem"], key=pki["server.key"])
    server, address = await start_agent(keys, tls)
    client = client_for(keys, address, None)
    try:
        with pytest.raises(SiteUnavailable, match="closed the plaintext connection: if it serves"):
            await client.describe(SITE)
    finally:
        await client.close()
        await server.stop(None)


async def test_mtls_needs_the_broker_client_certificate(tmp_path, keys, pki) -> None:
    tls = TlsConfig(cert=pki["server.pem"], key=pki["server.key"], client_ca=pki["ca.pem"])
    server, address = await start_agent(keys, tls)
    without = client_for(keys, address, pinned(tmp_path / "a", pki["ca.pem"]))
    mtls = {"client_cert_file": pki["client.pem"], "client_key_file": pki["client.key"]}
    with_cert = client_for(keys, address, pinned(tmp_path / "b", pki["ca.pem"], **mtls))
    try:
        with pytest.raises(SiteUnavailable):
            await without.describe(SITE)
        await describe_and_execute(with_cert)
    finally:
        await without.close()
        await with_cert.close()
        await server.stop(None)


async def test_unreadable_certificate_is_a_config_error(tmp_path, pki) -> None:
    server = grpc.aio.server()
    with pytest.raises(ConfigError, match="tls.cert: cannot read"):
        bind(server, "127.0.0.1:0", TlsConfig(cert=tmp_path / "missing.pem", key=pki["server.key"]))
    not_pem = tmp_path / "x.pem"
    not_pem.write_text("hello")
    with pytest.raises(ConfigError, match="is not a PEM file"):
        bind(server, "127.0.0.1:0", TlsConfig(cert=not_pem, key=pki["server.key"]))


async def test_consul_probes_a_tls_agent_over_tls() -> None:
    record = SiteRecord(
        site=SITE,
        institution="Example",
        grpc_address="127.0.0.1:50051",
        agent_version="0",
        versions=Versions(nnsight="0.8.1", torch="2", transformers="5", python="3.11"),
        hardware=Hardware(vendor="cpu", device_type="cpu", count=1),
    )
    async with FakeConsul() as fake:
        for tls in (False, True):
            catalog = ConsulCatalog(ConsulSettings(addr=fake.url, grpc_tls=tls))
            await catalog.register(record, 15.0, 60.0)
            assert fake.state.checks[grpc_check_id(SITE)].grpc_use_tls is tls
            await catalog.deregister(SITE)
            await catalog.aclose()
