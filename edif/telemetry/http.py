"""A small `/metrics` HTTP server for processes without an HTTP front (the site agent).

It runs on a daemon thread (prometheus_client's WSGI server) so a scrape never waits on the
agent's event loop, and serves the process's own registry only. Off unless a port is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server

from edif.errors import ConfigError
from edif.telemetry.providers import Telemetry


@dataclass
class MetricsServer:
    server: WSGIServer
    thread: Thread

    @property
    def port(self) -> int:
        return self.server.server_port

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_metrics(telemetry: Telemetry, host: str, port: int) -> MetricsServer:
    """Serve `telemetry`'s Prometheus text on host:port (0: any free port)."""
    if telemetry.registry is None:
        raise ConfigError("metrics are not exported by this process; nothing to serve")
    try:
        server, thread = start_http_server(port, addr=host, registry=telemetry.registry)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from exc
    return MetricsServer(server, thread)
