"""The bench's floor server (`bench/ideal_broker.py`) is a conforming nnsight 0.8.1 server.

The bench subtracts its times from the mesh's, so a floor that skipped part of the protocol
(a status frame, the URL download, the inline frame) would flatter the mesh. Here the real
client runs a trace against it, inline and by URL, and must get back exactly the result the
server was handed, after the same status frames a broker sends.
"""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import httpx
import nnsight
import pytest
import torch
from nnsight.intervention.backends.remote import RemoteBackend
from processes import stop_process

from edif.demo import TINY_GPT2, load
from edif.up import free_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def floor():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "ideal_broker.py"), "--port", str(port)],
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/ping").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "floor server did not start"
        time.sleep(0.1)
    yield url
    stop_process(proc, grace_s=10)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    return load(TINY_GPT2, home=tmp_path_factory.mktemp("home"))


@pytest.mark.parametrize("via", ["inline", "url"])
def test_the_client_gets_the_canned_result_after_the_broker_statuses(floor, model, via):
    canned = {"x": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    buffer = io.BytesIO()
    torch.save(canned, buffer)
    statuses = {"via": via, "statuses": "QUEUED,DISPATCHED,RUNNING"}
    reply = httpx.put(f"{floor}/_canned", params=statuses, content=buffer.getvalue())
    assert reply.status_code == 200
    seen: list[str] = []

    class Recording(RemoteBackend):
        def parse(self, message):  # noqa: ANN001, ANN202 - the client's own signature
            response = super().parse(message)
            seen.append(response.status.value)
            return response

    compress, nnsight.CONFIG.API.COMPRESS = nnsight.CONFIG.API.COMPRESS, False
    try:
        backend = Recording(model.to_model_key(), host=floor, api_key="unused")
        with model.trace("The capital of France is", backend=backend):
            x = torch.zeros(1).save()
    finally:
        nnsight.CONFIG.API.COMPRESS = compress
    assert torch.equal(x, canned["x"])
    assert seen == ["QUEUED", "DISPATCHED", "RUNNING", "COMPLETED"]
