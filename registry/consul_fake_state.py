"""The state behind the fake Consul: one agent on one node, with Consul's documented rules.

What it models (and `registry.consul_fake` serves over HTTP):

- Service registration as the agent endpoint takes it: field names matched case-insensitively
  and in snake_case too (Consul decodes both); `Meta` checked against Consul's limits (64
  keys, keys `[A-Za-z0-9_-]{1,128}` not starting `consul-`, values ≤ 512 bytes); `Check` and
  `Checks` of kind TTL or GRPC (others are refused: the adapter uses none); check IDs default
  to `service:<id>` / `service:<id>:<n>`; a check starts `critical` unless `Status` says
  otherwise; `DeregisterCriticalServiceAfter` below one minute is raised to one minute;
  `replace-existing-checks` drops the service's checks the request does not list.
- TTL checks: pass/warn/fail set status and output and restart the TTL; a TTL that runs out
  turns the check critical with output "TTL expired" (`tick`, after the clock moves).
- The reaper (`reap`): a service with a check critical for longer than that check's
  deregister window is deregistered with all its checks. Real Consul runs this every ~30 s;
  here whoever drives the clock calls it.
- Indexes: a raft-like index grows by one on every write that changes what a reader sees (a
  TTL pass that changes neither status nor output writes nothing, as in Consul). Each service
  name remembers the index of its last write; `/v1/health/service/<name>` reports that (the
  global index for a name never seen). `wait_for_change` is the blocking query: it returns
  once the name's index passes the client's, after `wait`, or at once when the indexes were
  reset (`force_index`, standing in for a snapshot restore, where Consul drops all blocking
  queries and the index may go backwards).
- gRPC checks run no probes here: tests set their status (`set_check_status`), or
  `FakeConsul.probe_grpc` probes them.

Times are `Clock.monotonic()`; blocking waits are real time (the client waits in real time).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edif.clock import Clock
from registry.durations import parse_go_duration
from registry.model import Health
from registry.ttl import CheckState

NODE = "fake-consul-node"
DATACENTER = "dc1"
MIN_DEREGISTER_S = 60.0
_STATUSES = ("passing", "warning", "critical")
_META_KEY = re.compile(r"^[a-zA-Z0-9_-]+$")
_PASS_THE_ID = "Ensure that the ID is passed, not the name."


class ConsulApiError(Exception):
    """An answer Consul gives as an HTTP error: status code and plain-text body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class FakeCheck:
    check_id: str
    name: str
    kind: str  # "ttl" | "grpc"
    service_id: str
    state: CheckState
    grpc: str = ""
    grpc_use_tls: bool = False
    interval: str = ""
    timeout: str = ""
    notes: str = ""


@dataclass
class FakeService:
    service_id: str
    name: str
    address: str
    port: int
    tags: list[str]
    meta: dict[str, str]
    create_index: int
    modify_index: int
    check_ids: list[str] = field(default_factory=list)


class ConsulState:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.index = 1  # Consul's indexes are never below 1
        self.services: dict[str, FakeService] = {}
        self.checks: dict[str, FakeCheck] = {}
        self._name_index: dict[str, int] = {}
        self._epoch = 0  # bumped when blocking queries must all return (index reset)
        self._closed = False
        self.held = 0  # blocking queries being held right now
        self._changed = asyncio.Event()

    # -- agent endpoints ---------------------------------------------------------------------

    def register(self, body: Mapping[str, Any], replace_existing_checks: bool) -> None:
        fields = _normalized(body)
        name = fields.get("name") or ""
        if not name:
            raise ConsulApiError(400, "Missing service name")
        sid = fields.get("id") or name
        meta = dict(fields.get("meta") or {})
        _validate_meta(meta)
        definitions = ([fields["check"]] if fields.get("check") else []) + list(
            fields.get("checks") or []
        )
        checks = [self._check(sid, name, d, i, len(definitions)) for i, d in enumerate(definitions)]
        self._store_service(fields, sid, name, meta, checks, replace_existing_checks)

    def deregister(self, service_id: str) -> None:
        service = self.services.get(service_id)
        if service is None:
            raise ConsulApiError(404, f'Unknown service ID "{service_id}". {_PASS_THE_ID}')
        self._remove(service)

    def update_ttl(self, check_id: str, status: str, output: str) -> None:
        check = self.checks.get(check_id)
        if check is None:
            raise ConsulApiError(404, f'Unknown check ID "{check_id}". {_PASS_THE_ID}')
        if check.kind != "ttl":
            raise ConsulApiError(500, f'CheckID "{check_id}" does not have associated TTL')
        self.set_check_status(check_id, _status(status), output)

    # -- test hooks and the clock -----------------------------------------------------------

    def set_check_status(self, check_id: str, status: Health, output: str = "") -> None:
        """Any check, any status: what a probe (or a test standing in for one) reports."""
        check = self.checks[check_id]
        if check.state.update(status, output, self._now()):
            self._write(self.services[check.service_id].name)

    def tick(self) -> None:
        """Turn TTL checks whose TTL ran out critical."""
        now = self._now()
        for check in self.checks.values():
            if check.state.expire(now):
                self._write(self.services[check.service_id].name)

    def reap(self) -> list[str]:
        """Deregister services with a check critical past its window; their IDs."""
        self.tick()
        now = self._now()
        doomed = {c.service_id for c in self.checks.values() if c.state.reapable(now)}
        for sid in sorted(doomed):
            self._remove(self.services[sid])
        return sorted(doomed)

    def force_index(self, index: int) -> None:
        """Set every index to `index` (may go backwards) and drop all blocking queries."""
        self.index = index
        self._name_index = dict.fromkeys(self._name_index, index)
        self.release_waiters()

    def release_waiters(self) -> None:
        self._epoch += 1
        self._notify()

    def close(self) -> None:
        """From now on blocking queries return at once (the server is shutting down)."""
        self._closed = True
        self.release_waiters()

    # -- health endpoint --------------------------------------------------------------------

    def index_of(self, name: str) -> int:
        return self._name_index.get(name, self.index)

    def health_service(self, name: str, passing: bool) -> list[dict[str, Any]]:
        self.tick()
        entries = [
            self._entry(s) for s in sorted(self.services.values(), key=lambda s: s.service_id)
        ]
        entries = [e for e in entries if e["Service"]["Service"] == name]
        if passing:
            entries = [e for e in entries if all(c["Status"] == "passing" for c in e["Checks"])]
        return entries

    async def wait_for_change(self, name: str, index: int, wait_s: float) -> None:
        """Block until the name's index passes `index`, `wait_s` passes, or waiters are
        released. Wakes on every write and re-checks: writes to other names do not count.
        As in Consul, an `index` above the current one (a client from before a restore)
        also blocks: the client sees the index went backwards only when `wait` ends."""
        loop = asyncio.get_running_loop()
        deadline, epoch = loop.time() + wait_s, self._epoch
        self.held += 1
        try:
            while self.index_of(name) <= index and self._epoch == epoch and not self._closed:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)
        finally:
            self.held -= 1

    # -- internals --------------------------------------------------------------------------

    def _check(self, sid: str, name: str, raw: Mapping[str, Any], i: int, n: int) -> FakeCheck:
        d = _normalized(raw)
        default_id = f"service:{sid}:{i + 1}" if n > 1 else f"service:{sid}"
        check_id = d.get("checkid") or d.get("id") or default_id
        if d.get("ttl"):
            kind = "ttl"
        elif d.get("grpc"):
            kind = "grpc"
            if not d.get("interval"):
                raise ConsulApiError(400, "Invalid check: GRPC checks need an Interval")
        else:
            raise ConsulApiError(400, "This fake Consul supports TTL and GRPC checks only")
        state = CheckState(
            _status(d.get("status") or "critical"),
            "",
            self._now(),
            ttl_s=_duration(d["ttl"]) if kind == "ttl" else None,
            deregister_after_s=_deregister_after(d.get("deregistercriticalserviceafter")),
        )
        return FakeCheck(
            check_id=check_id,
            name=d.get("name") or f"Service '{name}' check",
            kind=kind,
            service_id=sid,
            state=state,
            grpc=d.get("grpc") or "",
            grpc_use_tls=bool(d.get("grpcusetls")),
            interval=d.get("interval") or "",
            timeout=d.get("timeout") or "",
            notes=d.get("notes") or "",
        )

    def _store_service(
        self,
        fields: Mapping[str, Any],
        sid: str,
        name: str,
        meta: dict[str, str],
        checks: list[FakeCheck],
        replace_existing_checks: bool,
    ) -> None:
        old = self.services.get(sid)
        kept = [] if old is None or replace_existing_checks else old.check_ids
        for check_id in set(old.check_ids if old else []) - set(kept):
            self.checks.pop(check_id, None)
        self.index += 1
        self.services[sid] = FakeService(
            service_id=sid,
            name=name,
            address=fields.get("address") or "",
            port=int(fields.get("port") or 0),
            tags=list(fields.get("tags") or []),
            meta=meta,
            create_index=old.create_index if old else self.index,
            modify_index=self.index,
            check_ids=list(dict.fromkeys(kept + [c.check_id for c in checks])),
        )
        self.checks.update({c.check_id: c for c in checks})
        self._mark(name)

    def _remove(self, service: FakeService) -> None:
        for check_id in service.check_ids:
            self.checks.pop(check_id, None)
        del self.services[service.service_id]
        self._write(service.name)

    def _entry(self, service: FakeService) -> dict[str, Any]:
        checks = [_check_json(self.checks[c], service) for c in service.check_ids]
        return {
            "Node": _node_json(),
            "Service": _service_json(service),
            "Checks": [dict(_SERF), *checks],
        }

    def _write(self, name: str) -> None:
        self.index += 1
        self._mark(name)

    def _mark(self, name: str) -> None:
        self._name_index[name] = self.index
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _now(self) -> float:
        return self.clock.monotonic()


def _normalized(body: Mapping[str, Any]) -> dict[str, Any]:
    """Keys as Consul matches them: `GRPCUseTLS`, `grpc_use_tls` and `GrpcUseTls` are one."""
    if not isinstance(body, Mapping):
        raise ConsulApiError(400, "Request decode failed: expected an object")
    return {str(k).replace("_", "").replace("-", "").lower(): v for k, v in body.items()}


def _validate_meta(meta: Mapping[str, Any]) -> None:
    def invalid(reason: str) -> ConsulApiError:
        return ConsulApiError(400, f"Invalid Service Meta: {reason}")

    if len(meta) > 64:
        raise invalid("Node metadata cannot contain more than 64 key/value pairs")
    for key, value in meta.items():
        if not key:
            raise invalid("Key cannot be blank")
        if not _META_KEY.match(key):
            raise invalid(f"Key contains invalid characters: {key}")
        if len(key) > 128:
            raise invalid(f"Key is too long (limit: 128 characters): {key}")
        if key.startswith("consul-"):
            raise invalid(f'Key prefix "consul-" is reserved for internal use: {key}')
        if not isinstance(value, str):
            raise ConsulApiError(400, "Request decode failed: Meta values must be strings")
        if len(value.encode()) > 512:
            raise invalid(f"Value is too long (limit: 512 characters): {key}")


def _status(text: str) -> Health:
    if text not in _STATUSES:
        raise ConsulApiError(400, f'Invalid check status: "{text}"')
    return text  # type: ignore[return-value]


def _duration(text: Any) -> float:
    try:
        return parse_go_duration(str(text))
    except ValueError as err:
        raise ConsulApiError(
            400, f"Request decode failed: time: invalid duration {text!r}"
        ) from err


def _deregister_after(text: Any) -> float | None:
    if not text:
        return None
    return max(_duration(text), MIN_DEREGISTER_S)  # Consul's floor, logged as a warning there


def _node_json() -> dict[str, Any]:
    return {
        "ID": "00000000-0000-0000-0000-00000000fa4e",
        "Node": NODE,
        "Address": "127.0.0.1",
        "Datacenter": DATACENTER,
        "TaggedAddresses": {"lan": "127.0.0.1", "wan": "127.0.0.1"},
        "Meta": {},
        "CreateIndex": 1,
        "ModifyIndex": 1,
    }


def _service_json(service: FakeService) -> dict[str, Any]:
    return {
        "ID": service.service_id,
        "Service": service.name,
        "Tags": list(service.tags),
        "Address": service.address,
        "Meta": dict(service.meta),
        "Port": service.port,
        "Weights": {"Passing": 1, "Warning": 1},
        "EnableTagOverride": False,
        "CreateIndex": service.create_index,
        "ModifyIndex": service.modify_index,
    }


def _check_json(check: FakeCheck, service: FakeService) -> dict[str, Any]:
    return {
        "Node": NODE,
        "CheckID": check.check_id,
        "Name": check.name,
        "Status": check.state.status,
        "Notes": check.notes,
        "Output": check.state.output,
        "ServiceID": service.service_id,
        "ServiceName": service.name,
        "ServiceTags": list(service.tags),
        "Type": check.kind,
        "Interval": check.interval,
        "Timeout": check.timeout,
        "Definition": {},
    }


# The node's own liveness check, which Consul lists with every service on the node.
_SERF = {
    "Node": NODE,
    "CheckID": "serfHealth",
    "Name": "Serf Health Status",
    "Status": "passing",
    "Notes": "",
    "Output": "Agent alive and reachable",
    "ServiceID": "",
    "ServiceName": "",
    "ServiceTags": [],
    "Type": "",
    "Interval": "",
    "Timeout": "",
    "Definition": {},
}
