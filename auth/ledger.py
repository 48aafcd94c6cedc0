"""The issued-tokens ledger behind `edif token list`: what was issued, never the token itself.

Each `edif token issue` appends one JSON line to `issued.jsonl` in the keys folder: the token's
`jti`, role, groups, site, `kid`, issue and expiry times and the holder as a pseudonym (keyed
hash, `auth.pseudonym`), so operators can find and revoke a token without the ledger holding
raw user ids or anything that could be replayed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jwt

FILENAME = "issued.jsonl"


def record(directory: Path, token: str, pseudonym: str) -> None:
    """Append the facts of a freshly issued `token` (its claims are trusted: we just signed it)."""
    claims = jwt.decode(token, options={"verify_signature": False})
    entry = {
        "jti": claims["jti"],
        "holder": pseudonym,
        "role": claims.get("role"),
        "groups": claims.get("groups", []),
        "site": claims.get("site"),
        "kid": jwt.get_unverified_header(token).get("kid"),
        "iat": claims.get("iat"),
        "exp": claims.get("exp"),
    }
    with (Path(directory) / FILENAME).open("a") as out:
        out.write(json.dumps(entry, sort_keys=True) + "\n")


def entries(directory: Path) -> list[dict[str, Any]]:
    path = Path(directory) / FILENAME
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
