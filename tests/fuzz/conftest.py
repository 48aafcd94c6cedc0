"""Fixtures for the fuzz suite: brokers over fake sites, built once per module.

Every fuzz test shares one app per module on purpose: after hundreds of malformed requests the
same broker must still serve a normal one. `tests/broker/broker_fakes.py` supplies the fake
sites and authenticator (that folder is not a package, so it is put on the path here).
"""

from __future__ import annotations

import sys
from pathlib import Path

import anyio._backends._asyncio  # noqa: F401  (before nnsight: spec §11.4)
import pytest
from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "broker"))

from broker_fakes import (  # noqa: E402
    GPT2_KEY,
    SITES,
    FakeAuthenticator,
    FakeSiteClient,
    describe,
    settings_for,
)

from auth.keys import KeyStore  # noqa: E402
from auth.tokens import TokenIssuer  # noqa: E402
from broker.app import create_app  # noqa: E402
from broker.catalog import SiteCatalog  # noqa: E402
from broker.main import build_app, lifespan_for  # noqa: E402
from broker.results import DiskResultStore  # noqa: E402
from broker.service import BrokerService  # noqa: E402
from edif.clock import FakeClock  # noqa: E402


@pytest.fixture(scope="module")
def protocol_client(tmp_path_factory):
    """The nnsight-facing routes over fake sites (site-a hosts gpt2) and fake tokens."""
    tmp_path = tmp_path_factory.mktemp("protocol")
    clock = FakeClock()
    sites = FakeSiteClient({"site-a": describe("site-a", GPT2_KEY), "site-b": describe("site-b")})
    settings = settings_for(tmp_path)
    catalog = SiteCatalog(SITES, sites, settings.describe_refresh_s, settings.startup_wait_s)
    results = DiskResultStore(
        settings.data_dir / "results", clock, settings.result_ttl_s, settings.max_result_bytes
    )
    service = BrokerService(settings, catalog, sites, results, lambda sub: "u-pseudo", clock)
    app = create_app(
        service, FakeAuthenticator(), settings, lambda: {"keys": []}, lifespan_for(service)
    )
    with TestClient(app, base_url="http://broker.test") as client:
        client.service = service  # type: ignore[attr-defined]
        yield client


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """The production wiring (`build_app`: real JWT verifier, joins, quota admin API) over a
    fake site client; returns (client, issuer, clock)."""
    tmp_path = tmp_path_factory.mktemp("mesh")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("EDIF_CONSUL_ADDR", raising=False)
        clock = FakeClock()
        settings = settings_for(tmp_path)
        sites = FakeSiteClient({})
        app = build_app(settings, site_client=sites, clock=clock)
        issuer = TokenIssuer(KeyStore(tmp_path / "keys"), clock=clock)
        with TestClient(app, base_url="http://broker.test") as client:
            yield client, issuer, clock
