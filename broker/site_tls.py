"""How the broker secures its gRPC channel to each site: plaintext, or TLS with which trust.

Role: a site that serves TLS says so when it joins (`JoinRequest.tls`: the PEM that issued its
certificate, and optionally the name to check in it). `SiteTlsPins` remembers that per site,
on disk (`<data_dir>/site-tls/<site>.json`, so a broker restart keeps the pins of sites that
re-register without joining again), and `channel_security(site)` answers what the gRPC client
needs:

- no pin: plaintext (loopback sites, static sites-file entries);
- a pin and `EDIF_BROKER_SITE_CA_FILE` set: TLS verified against that CA bundle only (the
  operator's trust wins over what a site sent);
- a pin and no bundle: TLS verified against the PEM the site sent at join (pinned; the join
  itself was authenticated by the operator's join token or the site's credential).

`EDIF_BROKER_SITE_CLIENT_CERT_FILE`/`..._KEY_FILE` add the broker's client certificate for
sites that require mTLS. A site that rejoins without TLS loses its pin.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from edif.errors import ConfigError
from registry.model import SITE_NAME

log = logging.getLogger(__name__)

MAX_PEM_CHARS = 64 * 1024


class TlsOffer(BaseModel):
    """What a TLS site tells the broker at join."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    trust_pem: str = Field(min_length=1, max_length=MAX_PEM_CHARS)
    server_name: str | None = Field(default=None, max_length=253)


@dataclass(frozen=True)
class ChannelSecurity:
    """TLS parameters of one site's channel; `source` says where the trust comes from."""

    root_pem: bytes
    server_name: str | None
    source: str  # "the broker's CA bundle <path>" or "the certificate pinned at join"
    client_cert: bytes | None = None
    client_key: bytes | None = None


class SiteTlsPins:
    def __init__(
        self,
        directory: Path | None,
        ca_file: Path | None = None,
        client_cert_file: Path | None = None,
        client_key_file: Path | None = None,
    ) -> None:
        self._directory = directory
        self._ca_file = ca_file
        self._ca = _read(ca_file, "EDIF_BROKER_SITE_CA_FILE") if ca_file else None
        self._client_cert = (
            _read(client_cert_file, "EDIF_BROKER_SITE_CLIENT_CERT_FILE")
            if client_cert_file
            else None
        )
        self._client_key = (
            _read(client_key_file, "EDIF_BROKER_SITE_CLIENT_KEY_FILE") if client_key_file else None
        )
        if (self._client_cert is None) != (self._client_key is None):
            raise ConfigError("set both EDIF_BROKER_SITE_CLIENT_CERT_FILE and ..._KEY_FILE")
        self._pins: dict[str, TlsOffer | None] = {}

    def record(self, site: str, offer: TlsOffer | None) -> None:
        """What the site said at its latest join (None: plaintext)."""
        if not SITE_NAME.match(site):
            raise ValueError(f"bad site name {site!r}")
        self._pins[site] = offer
        path = self._path(site)
        if path is None:
            return
        if offer is None:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(offer.model_dump_json())
        tmp.replace(path)
        log.info("site %s serves TLS; its trust is recorded", site)

    def channel_security(self, site: str) -> ChannelSecurity | None:
        offer = self._lookup(site)
        if offer is None:
            return None
        if self._ca is not None:
            root, source = self._ca, f"the broker's CA bundle {self._ca_file}"
        else:
            root, source = offer.trust_pem.encode(), "the certificate pinned when it joined"
        return ChannelSecurity(root, offer.server_name, source, self._client_cert, self._client_key)

    def _lookup(self, site: str) -> TlsOffer | None:
        if site in self._pins:
            return self._pins[site]
        path = self._path(site)
        offer = None
        if path is not None and path.exists():
            try:
                offer = TlsOffer.model_validate(json.loads(path.read_text()))
            except (OSError, ValueError) as error:
                log.error("site %s: unreadable TLS pin %s: %s", site, path, error)
        self._pins[site] = offer
        return offer

    def _path(self, site: str) -> Path | None:
        if self._directory is None or not SITE_NAME.match(site):
            return None
        return self._directory / f"{site}.json"


def _read(path: Path, setting: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"{setting}: cannot read {path}: {error.strerror}") from error
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{setting}: {path} is not a PEM file")
    return data
