"""The HTTP answer for a result URL: whole, one range (resume), or 416, streamed in chunks.

The bytes are read from the store in `CHUNK_BYTES` pieces as the client takes them, so a
download of any size holds about one chunk in memory. Every answer names the content by its
sha256 (`ETag`, `X-Edif-Sha256`, `Repr-Digest`) so a client can check a resumed download and
send `If-Range`; `Cache-Control: no-store` because the URL is a capability.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping

from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response, StreamingResponse

from broker.results.base import ResultFile
from broker.results.ranges import Partial, Unsatisfiable, plan

MEDIA_TYPE = "application/octet-stream"


async def download_response(stored: ResultFile, headers: Mapping[str, str], head: bool) -> Response:
    """The response to GET/HEAD of `stored`, honouring `Range` and `If-Range`."""
    common = _identity_headers(stored)
    decision = plan(headers.get("range"), headers.get("if-range"), stored.size, stored.etag)
    if isinstance(decision, Unsatisfiable):
        return JSONResponse(
            {
                "detail": f"The requested range is outside this result of {stored.size} bytes; "
                "request bytes=N- with N below the size, or omit Range."
            },
            status_code=416,
            headers={**common, "Content-Range": decision.content_range(stored.size)},
        )
    if isinstance(decision, Partial):
        start, length, status = decision.start, decision.length, 206
        common["Content-Range"] = decision.content_range(stored.size)
    else:
        start, length, status = 0, stored.size, 200
    common["Content-Length"] = str(length)
    if head:
        return Response(status_code=status, headers=common, media_type=MEDIA_TYPE)
    # Opening the source may touch the network (object storage): off the event loop.
    body = await run_in_threadpool(stored.chunks, start, length)
    return StreamingResponse(body, status_code=status, headers=common, media_type=MEDIA_TYPE)


def _identity_headers(stored: ResultFile) -> dict[str, str]:
    headers = {"Accept-Ranges": "bytes", "Cache-Control": "no-store"}
    if stored.sha256:
        digest = base64.b64encode(bytes.fromhex(stored.sha256)).decode()
        headers.update(
            {
                "ETag": stored.etag,
                "X-Edif-Sha256": stored.sha256,
                "Repr-Digest": f"sha-256=:{digest}:",  # RFC 9530: of the whole result
            }
        )
    return headers
