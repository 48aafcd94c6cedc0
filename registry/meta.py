"""A `SiteRecord` as Consul service metadata (a string→string map), and back.

Consul limits service Meta to 64 keys matching `[A-Za-z0-9_-]{1,128}` (none starting with
`consul-`), each value at most 512 bytes. Layout, schema 1:

    edif_schema            "1"
    site, institution, grpc_address, agent_version, max_concurrent_jobs   plain strings
    v_nnsight, v_torch, v_transformers, v_python                          versions
    hardware_0, hardware_1, ...   the Hardware object as compact JSON, split in 512-char parts
    models_0, models_1, ...       the model list as compact JSON, split the same way
    groups_0, groups_1, ...       allowed_groups as a JSON list (no keys when empty)

JSON is written ASCII-only (`\\uXXXX` escapes), so a part's characters are its bytes and any
split point is safe; the parts are joined in order until the first missing index. With ~11
fixed keys that leaves room for about 50 parts (~25 KB), a few hundred models. A record that
does not fit raises `SiteRecordTooLarge` at registration, never a half-written entry. `health`
is not stored: the catalog derives it from its checks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from edif.errors import SiteRecordTooLarge, SiteRecordUnreadable
from registry.model import Health, SiteRecord

SCHEMA = "1"
MAX_KEYS = 64
MAX_KEY_LENGTH = 128
MAX_VALUE_BYTES = 512
META_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

_SCALARS = ("site", "institution", "grpc_address", "agent_version")
_VERSIONS = ("nnsight", "torch", "transformers", "python")


def to_meta(record: SiteRecord) -> dict[str, str]:
    meta = {"edif_schema": SCHEMA, "max_concurrent_jobs": str(record.max_concurrent_jobs)}
    meta.update({name: getattr(record, name) for name in _SCALARS})
    meta.update({f"v_{name}": getattr(record.versions, name) for name in _VERSIONS})
    meta.update(_parts("hardware", record.hardware.model_dump()))
    meta.update(_parts("models", [m.model_dump() for m in record.models]))
    if record.allowed_groups:
        meta.update(_parts("groups", record.allowed_groups))
    check_limits(meta)
    return meta


def from_meta(meta: Mapping[str, str], health: Health = "passing") -> SiteRecord:
    if meta.get("edif_schema") != SCHEMA:
        raise SiteRecordUnreadable(f"catalog entry has schema {meta.get('edif_schema')!r}")
    try:
        fields: dict[str, Any] = {name: meta[name] for name in _SCALARS}
        fields["versions"] = {name: meta[f"v_{name}"] for name in _VERSIONS}
        fields["max_concurrent_jobs"] = int(meta["max_concurrent_jobs"])
        fields["hardware"] = _joined(meta, "hardware", None)
        fields["models"] = _joined(meta, "models", [])
        fields["allowed_groups"] = _joined(meta, "groups", [])
        return SiteRecord(**fields, health=health)
    except (KeyError, ValueError, ValidationError) as err:  # JSONDecodeError is a ValueError
        site = meta.get("site", "?")
        raise SiteRecordUnreadable(
            f"catalog entry for site {site!r} does not decode: {err}"
        ) from err


def check_limits(meta: Mapping[str, str]) -> None:
    """Consul's own Meta rules, checked here so a registration fails with a clear message."""
    if len(meta) > MAX_KEYS:
        raise SiteRecordTooLarge(
            f"site record needs {len(meta)} metadata keys, Consul allows {MAX_KEYS}: "
            "list fewer models or groups"
        )
    for key, value in meta.items():
        if not META_KEY.match(key) or key.startswith("consul-"):
            raise SiteRecordTooLarge(f"metadata key {key!r} is not allowed by Consul")
        if len(value.encode()) > MAX_VALUE_BYTES:
            raise SiteRecordTooLarge(
                f"metadata value {key!r} is {len(value.encode())} bytes, Consul allows "
                f"{MAX_VALUE_BYTES}: shorten it"
            )


def _parts(prefix: str, value: object) -> dict[str, str]:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=True)
    chunks = [text[i : i + MAX_VALUE_BYTES] for i in range(0, len(text), MAX_VALUE_BYTES)]
    return {f"{prefix}_{i}": chunk for i, chunk in enumerate(chunks)}


def _joined(meta: Mapping[str, str], prefix: str, missing: object) -> Any:
    chunks = []
    while (chunk := meta.get(f"{prefix}_{len(chunks)}")) is not None:
        chunks.append(chunk)
    if not chunks:
        if missing is None:
            raise KeyError(f"{prefix}_0")
        return missing
    return json.loads("".join(chunks))
