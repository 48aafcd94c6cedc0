"""A resumed 1 GiB download (issue 5): connection cut halfway, broker SIGKILLed, same URL.

LARGE: writes 1 GiB to a temporary folder and moves it over loopback about once (measured on
the shared 2-core dev machine: 7 to 10 s in all). Not skipped: it is the check that a broken large
download resumes with the right checksum, that a committed result survives a broker crash, and
that the broker streams (its peak memory stays flat while it sends 1 GiB).

Flow: a 1 GiB result is written through the store's writer (no site needed), then a real
broker process (`edif broker run`) serves it. The client streams it with httpx, hashing as it
goes, and closes the connection after 512 MiB; resumes with `Range: bytes=N-` and `If-Range`;
at 768 MiB the broker is SIGKILLed and restarted; the last resume finishes the download. The
sha256 of all bytes received must equal the checksum the store recorded at commit.
"""

from __future__ import annotations

import hashlib
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from broker.results import DiskResultStore, ResultRef
from edif.clock import SystemClock
from edif.up import free_port

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
SIZE = 1024 * MiB
CUT_AT = 512 * MiB  # the client drops the connection here
KILL_AT = 768 * MiB  # the broker dies here
STREAM_GROWTH_LIMIT = 64 * MiB  # what streaming 1 GiB may add to the broker's peak memory


def _write_result(results_dir: Path) -> tuple[ResultRef, str]:
    """Commit 1 GiB of random bytes through the store's writer; our own sha256 of them."""
    store = DiskResultStore(results_dir, SystemClock(), ttl_s=3600, max_bytes=2 * SIZE)
    writer = store.begin("job-1gib")
    expected = hashlib.sha256()
    block = os.urandom(4 * MiB)
    for index in range(SIZE // len(block)):
        chunk = index.to_bytes(8, "big") + block[8:]  # every block differs
        expected.update(chunk)
        writer.write(chunk)
    return writer.commit(SIZE, expected.hexdigest()), expected.hexdigest()


class _Broker:
    def __init__(self, home: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._env = {
            **os.environ,
            "EDIF_HOME": str(home),
            "EDIF_BROKER_HOST": "127.0.0.1",
            "EDIF_BROKER_PORT": str(self.port),
            "EDIF_BROKER_DATA_DIR": str(home / "broker"),
            "EDIF_BROKER_STARTUP_WAIT_S": "1",
        }
        self._log = home / "broker.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self._log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edif", "broker", "run"],
                env=self._env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self._log.read_text()[-2000:]
            try:
                if httpx.get(f"{self.url}/ping", timeout=2).text == "pong":
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("broker did not start: " + self._log.read_text()[-2000:])

    def memory(self, field: str) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no {field} for the broker")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # SIGKILL: no shutdown code runs
            self.proc.wait()


def _stream(
    client: httpx.Client, url: str, digest, received: int, stop_at: int | None, headers: dict
) -> tuple[httpx.Response, int]:
    """Hash what arrives until `stop_at` bytes in all (then drop the connection) or the end."""
    with client.stream("GET", url, headers=headers) as reply:
        for chunk in reply.iter_raw(MiB):
            digest.update(chunk)
            received += len(chunk)
            if stop_at is not None and received >= stop_at:
                break  # leaving the block closes the connection mid-body
    return reply, received


def test_resumed_1gib_download_after_cut_and_broker_crash(tmp_path: Path) -> None:
    began = time.monotonic()
    ref, expected = _write_result(tmp_path / "broker" / "results")
    assert ref.sha256 == expected
    written_s = time.monotonic() - began
    client_peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    broker = _Broker(tmp_path)
    broker.start()
    baseline = broker.memory("VmRSS")
    try:
        url = f"{broker.url}/results/{ref.job_id}/{ref.token}"
        digest = hashlib.sha256()
        with httpx.Client(timeout=60) as client:
            # 1. A plain download (as nnsight's client does it), cut after 512 MiB.
            first, received = _stream(client, url, digest, 0, CUT_AT, {})
            assert first.status_code == 200
            assert first.headers["content-length"] == str(SIZE)
            assert first.headers["x-edif-sha256"] == expected
            assert CUT_AT <= received < SIZE
            etag = first.headers["etag"]

            # 2. Resume where it broke; the broker dies at 768 MiB.
            resume = {"Range": f"bytes={received}-", "If-Range": etag}
            second, at_kill = _stream(client, url, digest, received, KILL_AT, resume)
            assert second.status_code == 206
            assert second.headers["content-range"] == f"bytes {received}-{SIZE - 1}/{SIZE}"
            peak = broker.memory("VmHWM")
            broker.kill()

            # 3. The restarted broker serves the same URL; the download finishes.
            broker.start()
            resume = {"Range": f"bytes={at_kill}-", "If-Range": etag}
            third, total = _stream(client, url, digest, at_kill, None, resume)
            assert third.status_code == 206
            assert third.headers["content-range"] == f"bytes {at_kill}-{SIZE - 1}/{SIZE}"
    finally:
        broker.kill()

    assert total == SIZE
    assert digest.hexdigest() == expected == ref.sha256
    # Streamed, not loaded: sending 768 MiB left the broker's peak memory near its start.
    assert peak - baseline < STREAM_GROWTH_LIMIT, (peak, baseline)
    client_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert client_peak - client_peak_before < STREAM_GROWTH_LIMIT
    elapsed = time.monotonic() - began
    grown = (peak - baseline) / MiB, (client_peak - client_peak_before) / MiB
    print(f"\n1 GiB resume: written {written_s:.1f} s, total {elapsed:.1f} s, peak memory")
    print(f"growth while streaming: broker +{grown[0]:.1f} MiB, client +{grown[1]:.1f} MiB")
