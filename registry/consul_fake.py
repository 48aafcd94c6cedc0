"""`FakeConsul`: an in-repo stand-in for the Consul HTTP API, for tests and demos.

Consul cannot be installed on the project's machines, so the adapter is tested against this
fake and, when `EDIF_CONSUL_ADDR` is set, against a real agent with the same tests. It serves
exactly the endpoints `ConsulCatalog` uses, with the semantics in `registry.consul_fake_state`:

    PUT /v1/agent/service/register[?replace-existing-checks=true]
    PUT /v1/agent/service/deregister/<service id>
    PUT /v1/agent/check/{pass,warn,fail}/<check id>[?note=...]
    GET /v1/health/service/<name>[?index=N&wait=30s][&passing]

Answers carry `X-Consul-Index`; a blocking query (`index` > 0) is held until the service's
index passes `index` or `wait` (default 5m, at most 10m, plus up to wait/16 of jitter as
Consul adds) runs out. Errors are Consul's status codes with plain-text bodies. With `token`
set, requests must present it (`X-Consul-Token`, `Authorization: Bearer`, or `?token=`);
otherwise 403 as under a default-deny ACL policy.

Flow: `async with FakeConsul() as fake:` binds 127.0.0.1 on a free port and serves from the
running event loop (uvicorn); `fake.url` is the address. Time is the injected clock (a
`FakeClock` by default): `advance(s)` moves it and expires TTLs, `reap()` runs Consul's
deregister reaper. For a demo on the system clock pass `auto_tick_s` (expire and reap that
often) and `grpc_probe_every_s` (probe gRPC checks for real). Tests can count requests
(`request_count`), inject failures (`fail_requests`), set any check's status
(`set_check_status`) and simulate a snapshot restore (`force_index`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import uvicorn
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from edif.clock import Clock, FakeClock
from registry.consul_fake_state import ConsulApiError, ConsulState
from registry.durations import parse_go_duration
from registry.model import Health

_DEFAULT_WAIT_S = 300.0
_MAX_WAIT_S = 600.0
_TTL_VERBS: dict[str, Health] = {"pass": "passing", "warn": "warning", "fail": "critical"}

Handler = Callable[[Request], Awaitable[Response]]


@dataclass
class _Failure:
    path_prefix: str
    status: int
    times: int | None  # None: until cleared
    body: str


class FakeConsul:
    def __init__(
        self,
        clock: Clock | None = None,
        *,
        token: str | None = None,
        jitter: bool = True,
        auto_tick_s: float | None = None,
        grpc_probe_every_s: float | None = None,
        grpc_probe_timeout_s: float = 2.0,
    ) -> None:
        self.clock = clock or FakeClock()
        self.state = ConsulState(self.clock)
        self.requests: list[tuple[str, str]] = []  # (method, path), in arrival order
        self._token = token
        self._jitter = jitter
        self._auto_tick_s = auto_tick_s
        self._probe_every_s = grpc_probe_every_s
        self._probe_timeout_s = grpc_probe_timeout_s
        self._failures: list[_Failure] = []
        self._server: uvicorn.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    async def __aenter__(self) -> FakeConsul:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app(),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._tasks.append(asyncio.create_task(self._server.serve(sockets=[sock])))
        while not self._server.started:
            if self._tasks[0].done():  # startup failed: surface its exception
                await self._tasks[0]
            await asyncio.sleep(0.005)
        self._start_loops()

    async def stop(self) -> None:
        self.state.close()  # held blocking queries answer now, so shutdown does not wait
        if self._server is not None:
            self._server.should_exit = True
        for task in self._tasks[1:]:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    # -- test and demo controls -------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Move the fake clock and expire TTLs (a real Consul's TTL timers fire on time)."""
        if not isinstance(self.clock, FakeClock):
            raise TypeError("advance() needs the FakeConsul to run on a FakeClock")
        self.clock.advance(seconds)
        self.state.tick()

    def reap(self) -> list[str]:
        """Run Consul's deregister reaper once; the service IDs it removed."""
        return self.state.reap()

    def set_check_status(self, check_id: str, status: Health, output: str = "") -> None:
        self.state.set_check_status(check_id, status, output)

    def force_index(self, index: int) -> None:
        self.state.force_index(index)

    async def until_held(self, count: int = 1, timeout_s: float = 5.0) -> None:
        """Wait until `count` blocking queries are being held (tests: a watch is parked)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.state.held < count:
            if loop.time() > deadline:
                raise TimeoutError(f"{self.state.held} blocking queries held, not {count}")
            await asyncio.sleep(0.01)

    def request_count(self, method: str | None = None, path_prefix: str = "") -> int:
        return sum(
            1
            for m, path in self.requests
            if (method is None or m == method) and path.startswith(path_prefix)
        )

    def fail_requests(
        self,
        path_prefix: str,
        status: int = 500,
        times: int | None = None,
        body: str = "injected failure",
    ) -> None:
        """Answer requests under `path_prefix` with `status` and `body`, `times` times (None:
        until `clear_failures`)."""
        self._failures.append(_Failure(path_prefix, status, times, body))

    def clear_failures(self) -> None:
        self._failures.clear()

    async def probe_grpc(self) -> None:
        """Probe every gRPC check once with the gRPC health protocol, as Consul would."""
        for check in list(self.state.checks.values()):
            if check.kind == "grpc" and not check.grpc_use_tls:
                status, output = await _probe(check.grpc, self._probe_timeout_s)
                if check.check_id in self.state.checks:  # not deregistered meanwhile
                    self.state.set_check_status(check.check_id, status, output)

    # -- HTTP -------------------------------------------------------------------------------

    def _app(self) -> Starlette:
        routes = [
            Route("/v1/agent/service/register", self._guard(self._register), methods=["PUT"]),
            Route(
                "/v1/agent/service/deregister/{service_id:path}",
                self._guard(self._deregister),
                methods=["PUT"],
            ),
            Route(
                "/v1/agent/check/{verb}/{check_id:path}",
                self._guard(self._check_update),
                methods=["PUT"],
            ),
            Route("/v1/health/service/{name:path}", self._guard(self._health), methods=["GET"]),
        ]
        return Starlette(routes=routes)

    def _guard(self, handler: Handler) -> Handler:
        """Count, enforce the ACL token, inject failures, map `ConsulApiError`."""

        async def guarded(request: Request) -> Response:
            self.requests.append((request.method, request.url.path))
            if (failure := self._failure_for(request.url.path)) is not None:
                return PlainTextResponse(failure.body, failure.status)
            if (denied := self._denied(request)) is not None:
                return denied
            try:
                return await handler(request)
            except ConsulApiError as err:
                return PlainTextResponse(err.message, err.status)

        return guarded

    async def _register(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body() or b"{}")
        except json.JSONDecodeError as err:
            raise ConsulApiError(400, f"Request decode failed: {err}") from err
        replace = request.query_params.get("replace-existing-checks", "") in ("true", "1")
        self.state.register(body, replace)
        return Response(status_code=200)

    async def _deregister(self, request: Request) -> Response:
        self.state.deregister(request.path_params["service_id"])
        return Response(status_code=200)

    async def _check_update(self, request: Request) -> Response:
        verb = request.path_params["verb"]
        if verb not in _TTL_VERBS:
            return PlainTextResponse("Not Found", 404)
        note = request.query_params.get("note", "")
        self.state.update_ttl(request.path_params["check_id"], _TTL_VERBS[verb], note)
        return Response(status_code=200)

    async def _health(self, request: Request) -> Response:
        name = request.path_params["name"]
        query = request.query_params
        index = _query_index(query.get("index"))
        if index > 0:
            await self.state.wait_for_change(name, index, self._wait_s(query.get("wait")))
        passing = "passing" in query and query["passing"].lower() not in ("0", "false")
        entries = self.state.health_service(name, passing)
        headers = {
            "X-Consul-Index": str(self.state.index_of(name)),
            "X-Consul-KnownLeader": "true",
            "X-Consul-LastContact": "0",
        }
        return JSONResponse(entries, headers=headers)

    def _wait_s(self, text: str | None) -> float:
        try:
            wait = parse_go_duration(text) if text else _DEFAULT_WAIT_S
        except ValueError as err:
            raise ConsulApiError(400, f"Invalid wait time: {err}") from err
        wait = min(wait, _MAX_WAIT_S)
        return wait + (random.uniform(0, wait / 16) if self._jitter else 0.0)

    def _failure_for(self, path: str) -> _Failure | None:
        for failure in self._failures:
            if path.startswith(failure.path_prefix):
                if failure.times is not None:
                    failure.times -= 1
                    if failure.times <= 0:
                        self._failures.remove(failure)
                return failure
        return None

    def _denied(self, request: Request) -> Response | None:
        if self._token is None:
            return None
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        given = request.headers.get("x-consul-token") or bearer or request.query_params.get("token")
        if not given:
            return PlainTextResponse("Permission denied: anonymous token lacks permission", 403)
        if given != self._token:
            return PlainTextResponse("ACL not found", 403)
        return None

    # -- background loops (system-clock demos) ----------------------------------------------

    def _start_loops(self) -> None:
        loops = [(self._auto_tick_s, self._tick), (self._probe_every_s, self.probe_grpc)]
        for period_s, step in loops:
            if period_s:
                self._tasks.append(asyncio.create_task(self._every(period_s, step)))

    async def _tick(self) -> None:
        self.state.tick()
        self.state.reap()

    @staticmethod
    async def _every(period_s: float, step: Callable[[], Awaitable[None]]) -> None:
        while True:
            await step()
            await asyncio.sleep(period_s)


def _query_index(text: str | None) -> int:
    if not text:
        return 0
    try:
        return int(text)
    except ValueError as err:
        raise ConsulApiError(400, f"Invalid index: {text!r}") from err


async def _probe(target: str, timeout_s: float) -> tuple[Health, str]:
    """Consul's gRPC check: `host:port[/service]`, SERVING is passing, anything else critical."""
    address, _, service = target.partition("/")
    request = health_pb2.HealthCheckRequest(service=service)
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            return "critical", f"gRPC check {target}: failed: {err.code().name}"
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return "passing", f"gRPC check {target}: success"
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return "critical", f"gRPC check {target}: {name}"
