"""A stand-in for an institution's OIDC provider: keys made here, a real JWKS over HTTP.

`FakeIdP` generates RS256 / ES256 / EdDSA keys, signs tokens with them and serves the public
half at `<url>/jwks` from a real HTTP server on 127.0.0.1 (a thread), counting the fetches so
tests can check caching and the refetch rate limit. Used by tests/auth and tests/e2e.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

_ALGORITHMS = {
    "RS256": (lambda: rsa.generate_private_key(65537, 2048), jwt.algorithms.RSAAlgorithm),
    "ES256": (lambda: ec.generate_private_key(ec.SECP256R1()), jwt.algorithms.ECAlgorithm),
    "EdDSA": (ed25519.Ed25519PrivateKey.generate, jwt.algorithms.OKPAlgorithm),
}


class FakeIdP:
    def __init__(self, issuer: str = "https://login.uni-example.eu/realms/uni") -> None:
        self.issuer = issuer
        self.keys: dict[str, tuple[Any, str]] = {}  # kid -> (private key, alg)
        self.published: list[str] = []
        self.hits = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.jwks_url = f"{self.url}/jwks"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeIdP:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_key(self, alg: str = "RS256", publish: bool = True) -> str:
        make, _ = _ALGORITHMS[alg]
        kid = f"{alg.lower()}-{secrets.token_hex(4)}"
        self.keys[kid] = (make(), alg)
        if publish:
            self.published.append(kid)
        return kid

    def jwks(self) -> dict[str, Any]:
        entries = []
        for kid in self.published:
            key, alg = self.keys[kid]
            jwk = json.loads(_ALGORITHMS[alg][1].to_jwk(key.public_key()))
            entries.append({**jwk, "kid": kid, "use": "sig", "alg": alg})
        # Real providers publish encryption keys too; the verifier must skip them.
        entries.append({"kty": "RSA", "use": "enc", "kid": "enc-1", "n": "AQAB", "e": "AQAB"})
        return {"keys": entries}

    def token(
        self,
        kid: str,
        audience: str = "edif",
        ttl_s: int = 600,
        now: float | None = None,
        alg: str | None = None,
        **claims: Any,
    ) -> str:
        key, key_alg = self.keys[kid]
        now = time.time() if now is None else now
        payload = {
            "iss": self.issuer,
            "aud": audience,
            "sub": "f3c1-uuid-of-alice",
            "email": "alice@uni-example.eu",
            "iat": int(now),
            "exp": int(now) + ttl_s,
            **claims,
        }
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, key, algorithm=alg or key_alg, headers={"kid": kid})

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path != "/jwks":
                    self.send_error(404)
                    return
                idp.hits += 1
                body = json.dumps(idp.jwks()).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler
