"""HTTP routes for joining sites; the decisions are `broker.joins.SiteRegistrar`'s.

Routes (every one takes `Authorization: Bearer <token>`):
`POST /sites/join` (a join token; body `JoinRequest`; reply `JoinReply`),
`POST /sites/{site}/rejoin` (that site's stored credential instead of a join token; same body
and reply),
`POST /sites/{site}/register` (body `SiteRecord`), `POST /sites/{site}/heartbeat`,
`POST /sites/{site}/credential` (a fresh site credential) and `POST /sites/{site}/leave`,
each with that site's credential. Errors are the app's typed ones (401, 403, 404 for a site the
catalog forgot, 400).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from broker.joins import JoinRequest, SiteRegistrar
from edif.errors import PermissionDenied
from registry.model import SiteRecord


def add_join_routes(app: FastAPI, registrar: SiteRegistrar) -> None:
    @app.post("/sites/join")
    async def join(body: JoinRequest, request: Request) -> JSONResponse:
        reply = registrar.join(_bearer(request), body)
        return JSONResponse(reply.model_dump(mode="json"), headers={"Cache-Control": "no-store"})

    @app.post("/sites/{site}/rejoin")
    async def rejoin(site: str, body: JoinRequest, request: Request) -> JSONResponse:
        if body.site != site:
            raise PermissionDenied(f"a request for site {body.site!r} cannot rejoin as {site!r}")
        reply = registrar.rejoin(_bearer(request), body)
        return JSONResponse(reply.model_dump(mode="json"), headers={"Cache-Control": "no-store"})

    @app.post("/sites/{site}/register")
    async def register(site: str, record: SiteRecord, request: Request) -> Response:
        await registrar.register(_bearer(request), site, record)
        return Response(status_code=204)

    @app.post("/sites/{site}/heartbeat")
    async def heartbeat(site: str, request: Request) -> Response:
        await registrar.heartbeat(_bearer(request), site)
        return Response(status_code=204)

    @app.post("/sites/{site}/credential")
    async def credential(site: str, request: Request) -> JSONResponse:
        reply = registrar.refresh(_bearer(request), site)
        return JSONResponse(reply.model_dump(mode="json"), headers={"Cache-Control": "no-store"})

    @app.post("/sites/{site}/leave")
    async def leave(site: str, request: Request) -> Response:
        await registrar.leave(_bearer(request), site)
        return Response(status_code=204)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None
