"""`AsyncConsul`: the py-consul client with an httpx transport, so every call is awaitable.

py-consul's API layer (endpoint paths, parameters, response callbacks and its exception
mapping) is transport-agnostic: `consul.std` drives it with requests (blocking) and
`consul.aio` with aiohttp, which this project does not install. This module supplies the
third transport on httpx, already a dependency. Being truly async matters for `watch()`: a
blocking query holds its request for up to `wait` seconds, and cancelling the watch must
drop that request at once, not leave a thread parked in it until Consul answers.

Timeouts: `request_timeout_s` for ordinary calls; a blocking query gets its `wait` plus
Consul's jitter (wait/16) on top, so a quiet catalog does not look like a dead one.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Coroutine
from typing import Any

import httpx
from consul import base

from registry.durations import parse_go_duration

# Consul holds a blocking query without `wait` for 5 minutes.
_DEFAULT_WAIT_S = 300.0

_Callback = Callable[[base.Response], Any]
_Params = list[tuple[str, Any]] | None
_Headers = dict[str, str] | None
_Data = str | bytes


class HttpxTransport(base.HTTPClient):
    def __init__(
        self,
        host: str,
        port: int,
        scheme: str,
        verify: bool | str,
        cert: Any,
        request_timeout_s: float,
    ) -> None:
        super().__init__(host, port, scheme, verify, cert)
        self._request_timeout_s = request_timeout_s
        # trust_env=False: no proxy or CA bundle from the environment slips in between the
        # broker and its Consul agent; configuration comes from ConsulSettings only.
        self._client = httpx.AsyncClient(verify=_ssl_context(verify, cert), trust_env=False)

    # The signatures are py-consul's; each returns a coroutine the API layer hands back.
    def get(
        self,
        callback: _Callback,
        path: str,
        params: _Params = None,
        headers: _Headers = None,
        raw: bool = False,
    ) -> Coroutine[Any, Any, Any]:
        return self._request(callback, "GET", path, params, headers, None, raw)

    def put(
        self,
        callback: _Callback,
        path: str,
        params: _Params = None,
        data: _Data = "",
        headers: _Headers = None,
    ) -> Coroutine[Any, Any, Any]:
        return self._request(callback, "PUT", path, params, headers, data)

    def delete(
        self,
        callback: _Callback,
        path: str,
        params: _Params = None,
        data: _Data = "",
        headers: _Headers = None,
    ) -> Coroutine[Any, Any, Any]:
        return self._request(callback, "DELETE", path, params, headers, data)

    def post(
        self,
        callback: _Callback,
        path: str,
        params: _Params = None,
        data: _Data = "",
        headers: _Headers = None,
    ) -> Coroutine[Any, Any, Any]:
        return self._request(callback, "POST", path, params, headers, data)

    async def close(self) -> None:
        await self._client.aclose()

    async def _request(
        self,
        callback: _Callback,
        method: str,
        path: str,
        params: _Params,
        headers: _Headers,
        data: _Data | None,
        raw: bool = False,
    ) -> Any:
        response = await self._client.request(
            method,
            self.uri(path, params),
            headers=headers,
            content=data or None,
            timeout=self._timeout(params),
        )
        body = response.content if raw else response.text
        return callback(base.Response(response.status_code, response.headers, body))

    def _timeout(self, params: _Params) -> float:
        given = dict(params or ())
        if "index" not in given:
            return self._request_timeout_s
        wait = parse_go_duration(given["wait"]) if "wait" in given else _DEFAULT_WAIT_S
        return self._request_timeout_s + wait + wait / 16


class AsyncConsul(base.Consul):
    """`consul.Consul` whose methods return coroutines; close with `await http.close()`."""

    def __init__(self, *args: Any, request_timeout_s: float = 10.0, **kwargs: Any) -> None:
        self._request_timeout_s = request_timeout_s
        super().__init__(*args, **kwargs)

    def http_connect(
        self, host: str, port: int, scheme: str, verify: bool | str = True, cert: Any = None
    ) -> HttpxTransport:
        return HttpxTransport(host, port, scheme, verify, cert, self._request_timeout_s)


def _ssl_context(verify: bool | str, cert: Any) -> ssl.SSLContext | bool:
    """httpx wants an SSLContext for a CA file or client certificate (string paths are
    deprecated there); plain True/False pass through."""
    if isinstance(verify, bool) and cert is None:
        return verify
    context = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
    if verify is False:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    if isinstance(cert, tuple):
        context.load_cert_chain(*cert)
    elif cert is not None:
        context.load_cert_chain(cert)
    return context
