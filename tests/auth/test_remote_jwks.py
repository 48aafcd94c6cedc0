"""RemoteJwks as a site agent uses it: the broker's JWKS over HTTP, following a key rotation."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from auth.keys import KeyStore, public_keys_from_jwks
from auth.remote_jwks import RemoteJwks
from auth.roles import Role
from auth.tokens import TokenIssuer, TokenVerifier
from edif.clock import FakeClock
from edif.errors import AuthenticationError


class JsonServer:
    """Serves `document()` as JSON on 127.0.0.1; `up = False` answers 503."""

    def __init__(self, document: Callable[[], dict]) -> None:
        self.document, self.up, self.hits = document, True, 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                server.hits += 1
                if not server.up:
                    self.send_error(503)
                    return
                body = json.dumps(server.document()).encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}/.well-known/jwks.json"
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()


@pytest.fixture
def broker(tmp_path):
    clock = FakeClock()
    store = KeyStore(tmp_path / "keys", clock)
    store.signing_key()
    server = JsonServer(store.jwks)
    yield store, clock, server
    server.close()


def test_site_verifier_follows_a_broker_rotation(broker):
    store, clock, server = broker
    remote = RemoteJwks(
        server.url, public_keys_from_jwks, clock, initial=public_keys_from_jwks(store.jwks())
    )
    verifier = TokenVerifier(remote, audience="edif-site:a", clock=clock)
    issuer = TokenIssuer(store, clock=clock)

    assert verifier.verify(issuer.issue("edif-broker", Role.BROKER, 60, audience="edif-site:a"))
    assert server.hits == 0  # the keys given at start-up (the join reply) are enough

    store.rotate(grace_s=3600)
    token = issuer.issue("edif-broker", Role.BROKER, 60, audience="edif-site:a")
    assert verifier.verify(token).role is Role.BROKER
    assert server.hits == 1


def test_an_unreachable_broker_keeps_the_known_keys(broker):
    store, clock, server = broker
    remote = RemoteJwks(server.url, public_keys_from_jwks, clock, max_age_s=60)
    kid = store.signing_key()[0]
    assert remote.key_for(kid) is not None
    server.up = False
    clock.advance(61)  # stale: a refresh is tried and fails
    assert remote.key_for(kid) is not None
    assert server.hits == 2


def test_never_fetched_is_an_authentication_error(broker):
    _, clock, server = broker
    server.up = False
    remote = RemoteJwks(server.url, public_keys_from_jwks, clock)
    with pytest.raises(AuthenticationError, match="could not be fetched"):
        remote.key_for("0123456789abcdef")
    assert remote.keys() == {}
