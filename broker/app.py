"""The broker's HTTP front: the nnsight 0.8.1 wire protocol and nothing else.

Every route translates between HTTP/websocket and the `JobService` protocol; decisions live in
the service. Errors are typed (`EdifError`) and mapped once, here, to their HTTP status with a
`{"detail": message}` body, which the nnsight client prints as
`RemoteError: Failed to send request: <message>`. Anything else is a bug: logged, answered 500.

Routes: `WS /subscribe`, `POST /request`, `GET /response/{id}`, `GET|HEAD /results/{id}/{token}`,
`GET /status`, `GET /env`, `GET /whoami`, `GET /ping`, `GET /.well-known/jwks.json`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

# Starlette imports anyio's asyncio backend lazily, on the first FileResponse or task group; if
# nnsight was imported first in this process (tests, an all-in-one demo), its `.save` mount
# breaks that import (spec §11.4). Importing it up front is harmless and avoids that.
import anyio._backends._asyncio  # noqa: F401
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from broker.config import BrokerSettings
from broker.ports import Authenticator, Identity, JobService
from broker.results.download import download_response
from edif.errors import AuthenticationError, BadRequest, EdifError, NotFound, PayloadTooLarge

log = logging.getLogger(__name__)

API_KEY_HEADER = "ndif-api-key"
MAX_ENVELOPE_BYTES = 1024 * 1024
_FORM_SLACK_BYTES = MAX_ENVELOPE_BYTES  # envelope and multipart framing on top of the blob

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def create_app(
    service: JobService,
    authenticator: Authenticator,
    settings: BrokerSettings,
    jwks: Callable[[], dict[str, Any]],
    lifespan: Lifespan | None = None,
) -> FastAPI:
    app = FastAPI(
        title="eDIF broker", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    _install_error_handlers(app)
    _add_protocol_routes(app, service, authenticator, settings)
    _add_service_routes(app, service, authenticator, jwks)
    return app


def _add_protocol_routes(
    app: FastAPI, service: JobService, authenticator: Authenticator, settings: BrokerSettings
) -> None:
    @app.websocket("/subscribe")
    async def subscribe(websocket: WebSocket) -> None:
        # Accept even without a valid key: a rejected upgrade reaches the user as an unreadable
        # handshake error, while the POST can say what is wrong (spec §3.1).
        identity = _identity_or_none(authenticator, websocket.headers.get(API_KEY_HEADER))
        await websocket.accept()
        session_id = await service.open_session(websocket, identity)
        try:
            await websocket.send_text(json.dumps({"session_id": session_id}))
            while (await websocket.receive())["type"] != "websocket.disconnect":
                pass  # the client never sends data; keep the socket until it closes
        except WebSocketDisconnect:
            pass
        finally:
            await service.close_session(session_id)

    @app.post("/request")
    async def submit(request: Request) -> JSONResponse:
        identity = await _authenticate_upload(request, authenticator, settings.max_payload_bytes)
        envelope, blob = await _read_submission(request, settings.max_payload_bytes)
        base_url = str(request.base_url).rstrip("/")
        status = await service.submit(identity, envelope, blob, request.headers, base_url)
        return JSONResponse(status.model_dump(mode="json"))

    @app.get("/response/{job_id}")
    async def poll(job_id: str, request: Request) -> JSONResponse:
        identity = _identity_or_none(authenticator, request.headers.get(API_KEY_HEADER))
        if identity is None:  # indistinguishable from "not yours": job ids are not disclosed
            raise NotFound("No job with this id belongs to you (or it is no longer kept).")
        status = await service.status_of(identity, job_id)
        return JSONResponse(status.model_dump(mode="json"))

    @app.api_route("/results/{job_id}/{token}", methods=["GET", "HEAD"])
    async def result(job_id: str, token: str, request: Request) -> Response:
        # Streamed in chunks from the store, with Range/If-Range so a broken download resumes.
        stored = await run_in_threadpool(service.open_result, job_id, token)
        return await download_response(stored, request.headers, request.method == "HEAD")


def _add_service_routes(
    app: FastAPI,
    service: JobService,
    authenticator: Authenticator,
    jwks: Callable[[], dict[str, Any]],
) -> None:
    @app.get("/status")
    async def status() -> JSONResponse:
        return JSONResponse(service.deployments())

    @app.get("/env")
    async def env() -> JSONResponse:
        return JSONResponse(service.environment())

    @app.get("/whoami")
    async def whoami(request: Request) -> JSONResponse:
        identity = _identity_or_none(authenticator, request.headers.get(API_KEY_HEADER))
        if identity is None:
            return JSONResponse({"email": None, "tags": []})
        tags = [str(identity.role), *identity.groups]
        return JSONResponse({"email": identity.sub, "tags": tags})

    @app.get("/ping")
    async def ping() -> PlainTextResponse:
        return PlainTextResponse("pong")

    @app.get("/.well-known/jwks.json")
    async def jwks_document() -> JSONResponse:
        return JSONResponse(jwks())


# -- request reading ------------------------------------------------------------------------


def _identity_or_none(authenticator: Authenticator, token: str | None) -> Identity | None:
    if not token:
        return None
    try:
        return authenticator.verify(token)
    except AuthenticationError:
        return None


async def _authenticate_upload(
    request: Request, authenticator: Authenticator, limit: int
) -> Identity:
    """Verify the key before parsing the body; on failure, drain it so the 401 arrives intact
    (a server that answers mid-upload and closes gives the client a broken pipe instead)."""
    try:
        return authenticator.verify(request.headers.get(API_KEY_HEADER))
    except AuthenticationError:
        await _drain(request, limit + _FORM_SLACK_BYTES)
        raise


async def _drain(request: Request, limit: int) -> None:
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            return


async def _read_submission(request: Request, limit: int) -> tuple[str, bytes]:
    """The envelope (`data` field) and payload (`blob` file part) of a multipart POST."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + _FORM_SLACK_BYTES:
        raise PayloadTooLarge(
            f"The request is {int(declared)} bytes; this broker accepts payloads up to {limit}."
        )
    try:
        form = await request.form(max_files=1, max_fields=8, max_part_size=MAX_ENVELOPE_BYTES)
    except StarletteHTTPException as error:  # Starlette's MultiPartException, as a 400
        raise BadRequest(f"The request body is not valid multipart data: {error.detail}") from None
    try:
        return await _envelope_of(form.get("data")), await _blob_of(form.get("blob"), limit)
    finally:
        await form.close()


async def _envelope_of(field: UploadFile | str | None) -> str:
    if field is None:
        raise BadRequest("The request has no 'data' field (the JSON request envelope).")
    if isinstance(field, UploadFile):
        raw = await field.read(MAX_ENVELOPE_BYTES + 1)
        if len(raw) > MAX_ENVELOPE_BYTES:
            raise BadRequest("The request envelope is larger than 1 MiB.")
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise BadRequest("The request envelope is not UTF-8 JSON.") from None
    return field


async def _blob_of(field: UploadFile | str | None, limit: int) -> bytes:
    if field is None:
        raise BadRequest("The request has no 'blob' file part (the serialized trace).")
    if not isinstance(field, UploadFile):
        raise BadRequest("The request's 'blob' must be a file part, not a plain field.")
    if field.size is not None and field.size > limit:
        raise PayloadTooLarge(
            f"The request payload is {field.size} bytes; this broker accepts at most {limit}."
        )
    return await field.read()


# -- errors ---------------------------------------------------------------------------------


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(EdifError)
    async def edif_error(request: Request, error: EdifError) -> Response:
        if error.http_status >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, error.message)
        return JSONResponse({"detail": error.message}, status_code=error.http_status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> Response:
        problems = "; ".join(str(e.get("msg", "")) for e in error.errors())
        return JSONResponse({"detail": f"Invalid request: {problems}"}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "Internal broker error."}, status_code=500)
