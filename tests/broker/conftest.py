"""Fixtures for broker tests: a service over fake sites, and a test client for the HTTP front."""

from __future__ import annotations

import shutil
import tempfile

import anyio._backends._asyncio  # noqa: F401  (before nnsight: spec §11.4)
import pytest
from broker_fakes import (
    GPT2_KEY,
    SITES,
    FakeAuthenticator,
    FakeSiteClient,
    describe,
    settings_for,
)
from fastapi.testclient import TestClient

from broker.app import create_app
from broker.catalog import SiteCatalog
from broker.main import lifespan_for
from broker.results import DiskResultStore
from broker.service import BrokerService
from edif.clock import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sites() -> FakeSiteClient:
    return FakeSiteClient({"site-a": describe("site-a", GPT2_KEY), "site-b": describe("site-b")})


@pytest.fixture
def make_service(tmp_path, sites, clock):
    """`make_service(**settings)` -> a BrokerService (not started) over the fake sites."""

    def build(**overrides) -> BrokerService:
        settings = settings_for(tmp_path, **overrides)
        catalog = SiteCatalog(SITES, sites, settings.describe_refresh_s, settings.startup_wait_s)
        results = DiskResultStore(
            settings.data_dir / "results", clock, settings.result_ttl_s, settings.max_result_bytes
        )
        return BrokerService(settings, catalog, sites, results, lambda sub: "u-pseudo", clock)

    return build


@pytest.fixture
def make_client(tmp_path, make_service):
    """`make_client(**settings)` -> a started TestClient over a service with fake sites."""
    opened: list[TestClient] = []

    def build(**overrides) -> TestClient:
        service = make_service(**overrides)
        settings = settings_for(tmp_path, **overrides)
        app = create_app(
            service, FakeAuthenticator(), settings, lambda: {"keys": []}, lifespan_for(service)
        )
        client = TestClient(app, base_url="http://broker.test")
        client.__enter__()
        client.service = service  # type: ignore[attr-defined]
        opened.append(client)
        return client

    yield build
    for client in opened:
        client.__exit__(None, None, None)


@pytest.fixture(scope="session")
def postgres_uri():
    """A real PostgreSQL 16 for the job store tests (pgserver's binaries, a Unix socket).

    Its data directory is outside pytest's 0700 temp tree: run as root, pgserver hands the
    directory to an unprivileged user, who must be able to reach it."""
    pgserver = pytest.importorskip("pgserver")  # a dev dependency: present under `make test`
    data = tempfile.mkdtemp(prefix="edif-test-pg-")
    server = pgserver.get_server(data, cleanup_mode="stop")
    yield server.get_uri()
    server.cleanup()
    shutil.rmtree(data, ignore_errors=True)
