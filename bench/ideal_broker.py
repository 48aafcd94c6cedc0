"""A server that speaks nnsight 0.8.1's remote protocol and does nothing else: the bench's floor.

    python bench/ideal_broker.py --port N            # the bench starts it; not for users

Why: the nnsight client pays costs of its own on every remote call (a new `httpx.Client` per
POST and per download, the websocket, serializing, `torch.load` of the result). A figure
"remote minus local" mixes those with what the mesh adds. Against this server, which answers
every request at once with a result it was handed beforehand, the same client pays only its
own costs plus the protocol's minimum, so:

    mesh's share as the client sees it  = remote p50 - ideal p50
    client's floor for a result of N B  = what the client needs when the server costs nothing

Flow: the bench `PUT`s a result blob (the exact bytes a real broker sent for that trace) to
`/_canned?via=inline|url&statuses=...`; the client opens `/subscribe` (one text frame, the
session id) and `POST`s `/request` (the multipart form is read and parsed, as any server
must, for the session id); the reply is RECEIVED, then the socket gets the status frames the
bench saw from the real broker and COMPLETED: the blob inside a binary frame, or a URL that
`GET` serves from memory in large pieces. No authentication, queueing, execution, storage or
checks: that is the point. It runs on the broker's own HTTP stack (Starlette on uvicorn, the
same `http`/`loop` implementations), so the difference measures the mesh, not the framework.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

# Before nnsight: its `.save` mount breaks anyio's lazy backend import (spec §11.4).
import anyio._backends._asyncio  # noqa: F401, I001
import uvicorn
from nnsight.schema.response import ResponseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from broker.main import HTTP_IMPL, LOOP_IMPL

PIECE_BYTES = 8 * 1024 * 1024  # one transport write per piece while serving a download
DEFAULT_STATUSES = ("QUEUED", "DISPATCHED", "RUNNING")


@dataclass
class Canned:
    blob: bytes = b""
    via: str = "inline"
    statuses: tuple[str, ...] = DEFAULT_STATUSES


@dataclass
class State:
    canned: Canned = field(default_factory=Canned)
    sockets: dict[str, WebSocket] = field(default_factory=dict)
    results: dict[str, bytes] = field(default_factory=dict)
    base_url: str = ""


def build_app(state: State) -> Starlette:
    async def subscribe(ws: WebSocket) -> None:
        await ws.accept()
        session = secrets.token_urlsafe(12)
        state.sockets[session] = ws
        await ws.send_text(json.dumps({"session_id": session}))
        try:
            while True:  # the client never sends; this only notices the close
                await ws.receive_bytes()
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            state.sockets.pop(session, None)

    async def request(req: Request) -> JSONResponse:
        form = await req.form()
        envelope = json.loads(form["data"])
        await form["blob"].read()
        job = secrets.token_urlsafe(16)
        ws = state.sockets.get(envelope.get("session_id") or "")
        if ws is not None:
            asyncio.get_running_loop().create_task(_answer(ws, job))
        body = ResponseModel(id=job, status="RECEIVED", description="received")
        return JSONResponse(json.loads(body.model_dump_json()))

    async def _answer(ws: WebSocket, job: str) -> None:
        canned = state.canned  # as it was when the job came in
        for status in canned.statuses:
            await ws.send_text(ResponseModel(id=job, status=status).model_dump_json())
        if canned.via == "inline":
            frame = ResponseModel(id=job, status="COMPLETED", data=canned.blob).pickle()
            await ws.send_bytes(frame)
            return
        token = secrets.token_urlsafe(32)
        state.results[token] = canned.blob
        done = ResponseModel(id=job, status="COMPLETED", data=f"{state.base_url}/r/{token}")
        await ws.send_text(done.model_dump_json())

    async def result(req: Request) -> Response:
        blob = state.results.pop(req.path_params["token"], None)
        if blob is None:
            return PlainTextResponse("no such result", status_code=404)
        headers = {"Content-Length": str(len(blob))}
        return StreamingResponse(_pieces(memoryview(blob)), headers=headers)

    async def canned(req: Request) -> PlainTextResponse:
        query = req.query_params
        statuses = query.get("statuses", ",".join(DEFAULT_STATUSES))
        state.canned = Canned(
            blob=await req.body(),
            via=query.get("via", "inline"),
            statuses=tuple(s for s in statuses.split(",") if s),
        )
        return PlainTextResponse(f"{len(state.canned.blob)} bytes, {state.canned.via}")

    async def ping(_req: Request) -> PlainTextResponse:
        return PlainTextResponse("pong")

    return Starlette(
        routes=[
            WebSocketRoute("/subscribe", subscribe),
            Route("/request", request, methods=["POST"]),
            Route("/r/{token}", result),
            Route("/_canned", canned, methods=["PUT"]),
            Route("/ping", ping),
        ]
    )


async def _pieces(view: memoryview) -> AsyncIterator[bytes]:
    for start in range(0, len(view), PIECE_BYTES):
        yield view[start : start + PIECE_BYTES]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    state = State()
    state.base_url = f"http://{args.host}:{args.port}"
    config = uvicorn.Config(
        build_app(state),
        host=args.host,
        port=args.port,
        log_level="warning",
        http=HTTP_IMPL,  # the broker's own choices, so the difference is the mesh's work
        loop=LOOP_IMPL,
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
