"""A real broker for the dashboard tests: `build_app` with real keys and tokens, fake sites.

The broker runs under uvicorn on 127.0.0.1 (a free port) in a thread, so a real browser can
talk to it. Tokens are real Ed25519 JWTs from a `TokenIssuer` over the broker's own key store;
only the site side is faked (`FakeSites`: two sites that describe models and answer every job
with a small result and 0.25 GPU-seconds), which keeps the suite free of Ray and model weights.
Chromium is Debian's (`/usr/bin/chromium`, installed by `.ci/run`), driven by Playwright.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import threading
import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from auth.keys import KeyStore
from auth.roles import Role
from auth.tokens import TokenIssuer
from broker.config import BrokerSettings
from broker.main import build_app
from proto import site_agent_pb2 as pb

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).parent / "screenshots"  # gitignored
GPT2 = {"repo_id": "openai-community/gpt2", "revision": None, "task": "text-generation"}
LLAMA = {"repo_id": "meta-llama/Llama-3.1-8B", "revision": None, "task": "text-generation"}
RESEARCHER_SUB = "alice@uni.example"
STAFF_SUB = "gov@edif.example"


def model_key(fields: dict) -> str:
    return "nnsight.modeling.transformers.TransformersModel:" + json.dumps(fields)


GPT2_KEY = model_key(GPT2)


def _deployment(fields: dict, queue_depth: int = 0, state: str = "RUNNING") -> pb.ModelDeployment:
    return pb.ModelDeployment(
        model_key=model_key(fields),
        repo_id=fields["repo_id"],
        task=fields["task"],
        state=state,
        queue_depth=queue_depth,
    )


@dataclass
class FakeSites:
    """The broker's `SiteClient`, answering from memory (see the module docstring)."""

    descriptions: dict[str, pb.SiteDescription] = field(default_factory=dict)

    def __post_init__(self) -> None:
        versions = {"nnsight": "0.8.1", "torch": torch.__version__, "transformers": "5.22.2"}
        self.descriptions = {
            "site-a": pb.SiteDescription(
                site="site-a", models=[_deployment(GPT2, queue_depth=2)], versions=versions
            ),
            "site-b": pb.SiteDescription(
                site="site-b",
                models=[_deployment(GPT2), _deployment(LLAMA, state="DEPLOYING")],
                versions=versions,
            ),
        }

    async def describe(self, site: str) -> pb.SiteDescription:
        return self.descriptions[site]

    async def execute(
        self, site: str, request: pb.ExecuteRequest
    ) -> AsyncGenerator[pb.ExecuteUpdate, None]:
        buffer = io.BytesIO()
        torch.save({"x": torch.arange(3)}, buffer)
        data = buffer.getvalue()
        yield pb.ExecuteUpdate(status=pb.StatusUpdate(phase=pb.RUNNING))
        yield pb.ExecuteUpdate(chunk=pb.ResultChunk(data=data))
        done = pb.ResultEnd(
            total_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            execution_s=0.25,
            peak_memory_bytes=1,
        )
        yield pb.ExecuteUpdate(done=done)

    async def cancel(self, site: str, job_id: str) -> bool:
        return True

    async def close(self) -> None:
        return None


@dataclass
class LiveBroker:
    url: str
    app: object
    issuer: TokenIssuer

    def token(self, role: Role, sub: str, groups: tuple[str, ...] = ()) -> str:
        return self.issuer.issue(sub, role, 600, groups=groups)

    def pseudonym(self, sub: str) -> str:
        return self.app.state.quotas.pseudonym(sub)  # type: ignore[attr-defined]

    def submit(self, token: str) -> httpx.Response:
        """POST /request as the nnsight client does (polled job: no websocket session)."""
        envelope = json.dumps({"model_key": GPT2_KEY, "session_id": "", "compress": False})
        return httpx.post(
            f"{self.url}/request",
            data={"data": envelope},
            files={"blob": ("request", b"blob", "application/octet-stream")},
            headers={"ndif-api-key": token, "nnsight-version": "0.8.1"},
            timeout=10,
        )

    def wait_charged(self, jobs: int, sub: str = RESEARCHER_SUB) -> None:
        """Until the ledger holds `jobs` charges for `sub` (charging follows the job's end)."""
        quotas = self.app.state.quotas  # type: ignore[attr-defined]
        name = quotas.pseudonym(sub)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            rows = [r for r in quotas.usage().rows if (r.scope, r.name) == ("user", name)]
            if rows and rows[0].jobs >= jobs:
                return
            time.sleep(0.05)
        raise AssertionError(f"{jobs} jobs were not charged in time")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def broker(tmp_path_factory) -> Iterator[LiveBroker]:
    root = tmp_path_factory.mktemp("dashboard")
    sites_file = root / "sites.yaml"
    sites_file.write_text(
        "sites:\n"
        '  - name: site-a\n    address: "127.0.0.1:1"\n'
        '  - name: site-b\n    address: "127.0.0.1:2"\n'
    )
    settings = BrokerSettings(
        data_dir=root / "broker",
        keys_dir=root / "keys",
        sites_file=sites_file,
        startup_wait_s=2.0,
        describe_refresh_s=60.0,
    )
    app = build_app(settings, site_client=FakeSites())
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="dashboard-broker", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the broker did not start")
        time.sleep(0.05)
    issuer = TokenIssuer(KeyStore(root / "keys"), settings.issuer)
    yield LiveBroker(f"http://127.0.0.1:{port}", app, issuer)
    server.should_exit = True
    thread.join(timeout=20)


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium through Playwright (skipped only where it is not installed)."""
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed at /usr/bin/chromium (.ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1440, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    context.close()


def screenshot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
