"""The site credential a joined agent keeps between runs, so it can rejoin without a join token.

Role: a join token is short-lived (minutes); the site credential the broker returns lives for
`site_credential_ttl_s` (a day by default) and is renewed while the agent runs. Stored in
`<state dir>/credential.json` (mode 0600; the state dir defaults to `$EDIF_HOME/agent/<site>`),
it lets a restarted agent, or the next allocation of an HPC site, rejoin by itself
(`POST /sites/{site}/rejoin`). The token itself is never logged.

Policy (pure, tested with a fake clock): a stored credential is usable while more than
`EXPIRY_SLACK_S` of it is left, for the same broker URL and site; it is renewed once half of
its lifetime has passed (`renew_due`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edif.config import edif_home

EXPIRY_SLACK_S = 30.0  # clock skew between hosts, and the rejoin call's own time


@dataclass(frozen=True)
class StoredCredential:
    broker_url: str
    site: str
    credential: str
    issued_at: float  # epoch seconds, by this host's clock
    expires_at: float

    def usable(self, broker_url: str, site: str, now: float) -> bool:
        return (
            self.broker_url == broker_url
            and self.site == site
            and now < self.expires_at - EXPIRY_SLACK_S
        )

    def renew_due(self, now: float) -> bool:
        return now >= self.renew_at

    @property
    def renew_at(self) -> float:
        return self.issued_at + (self.expires_at - self.issued_at) / 2

    def __repr__(self) -> str:  # never print the credential
        return f"StoredCredential(site={self.site!r}, expires_at={self.expires_at:.0f})"


def state_dir_for(site: str, configured: Path | None = None) -> Path:
    return configured if configured is not None else edif_home() / "agent" / site


class CredentialFile:
    """`credential.json` in the agent's state dir, written atomically with mode 0600."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "credential.json"

    def load(self) -> StoredCredential | None:
        try:
            raw = json.loads(self.path.read_text())
            return StoredCredential(**raw)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):
            return None  # unreadable: as good as none; a join token is needed then

    def save(self, stored: StoredCredential) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # an older file of that name may have had another mode
            os.write(fd, json.dumps(asdict(stored)).encode())
        finally:
            os.close(fd)
        os.replace(tmp, self.path)

    def forget(self) -> None:
        self.path.unlink(missing_ok=True)


def describe_expiry(stored: StoredCredential | None) -> str:
    if stored is None:
        return "none is stored"
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stored.expires_at))
    return f"the stored one expired at {when}"
