"""Real processes for end-to-end tests and benchmarks: a broker we can kill, and a clean stop.

`BrokerProcess` runs `edif broker run` on a fixed port and data directory (so a restart after
`kill()` is the same broker reopening its stores, as a service manager would restart it), with
the demo's sites file. `stop_process` is SIGTERM, then SIGKILL of the process group if it does
not go within the grace period. Used by `conftest.py`, the chaos and telemetry tests, and
`bench/chaos.py`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


def stop_process(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """Ask `proc` to stop; kill its whole process group if it has not after `grace_s`."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class BrokerProcess:
    """One broker process that can be killed and started again on the same port and data."""

    def __init__(
        self,
        home: Path,
        name: str,
        port: int,
        extra_env: dict[str, str] | None = None,
        logs: Path | None = None,
    ) -> None:
        self.home = home
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.data_dir = home / "run" / name
        self.log_path = (logs or home / "run" / "logs") / f"{name}.log"
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen | None = None

    def start(self) -> BrokerProcess:
        env = {
            **os.environ,
            "EDIF_HOME": str(self.home),
            "EDIF_BROKER_HOST": "127.0.0.1",
            "EDIF_BROKER_PORT": str(self.port),
            "EDIF_BROKER_SITES_FILE": str(self.home / "run" / "sites.yaml"),
            "EDIF_BROKER_DATA_DIR": str(self.data_dir),
            "EDIF_BROKER_HEARTBEAT_S": "1",
            **self.extra_env,
        }
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edif", "broker", "run"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> float:
        """Seconds until `/ping` answers."""
        began = time.monotonic()
        while time.monotonic() - began < timeout_s:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"broker {self.name} exited with {self.proc.returncode}; see {self.log_path}"
                )
            try:
                if httpx.get(f"{self.url}/ping", timeout=2).status_code == 200:
                    return time.monotonic() - began
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"broker {self.name} not ready after {timeout_s} s")

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing of the broker's shutdown path runs."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
