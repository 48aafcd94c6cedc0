"""The broker's telemetry over HTTP: `GET /metrics`, and spans for result downloads.

`add_telemetry_routes(app, telemetry)` adds `/metrics` (Prometheus text; no credentials, as
scrapers expect: every series is an aggregate without user labels) and wraps the app in
`ResultDownloads`, an ASGI middleware that times each `GET /results/{job_id}/...` as a span in
that job's trace and counts the bytes actually sent (a ranged or broken download counts what
went out). The URL's capability token never reaches a span or a label.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from opentelemetry.trace import Status, StatusCode

from broker.telemetry import BrokerTelemetry
from edif.telemetry.providers import PROMETHEUS_CONTENT_TYPE

_RESULTS = "/results/"


def add_telemetry_routes(app: FastAPI, telemetry: BrokerTelemetry) -> None:
    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(telemetry.telemetry.prometheus_text(), media_type=PROMETHEUS_CONTENT_TYPE)

    app.add_middleware(ResultDownloads, telemetry=telemetry)


class ResultDownloads:
    """ASGI middleware: a span and a byte count per result download (see module doc)."""

    def __init__(self, app: Any, telemetry: BrokerTelemetry) -> None:
        self.app = app
        self.telemetry = telemetry

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith(_RESULTS):
            await self.app(scope, receive, send)
            return
        job_id = path[len(_RESULTS) :].split("/", 1)[0]
        span = self.telemetry.traces.download(job_id)
        sent = 0
        status = 0

        async def counting(message: dict) -> None:
            nonlocal sent, status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, counting)
        finally:
            if 200 <= status < 400:
                self.telemetry.metrics.downloaded(sent)
            if span is not None:
                span.set_attributes({"http.response.status_code": status, "edif.bytes_sent": sent})
                if status >= 500 or status == 0:
                    span.set_status(Status(StatusCode.ERROR))
                span.end()
