"""Small fakes for the broker's interfaces: sites, authentication, websockets."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass, field

import torch

from broker.config import BrokerSettings, SiteEntry
from edif.errors import AuthenticationError, SiteUnavailable
from proto import site_agent_pb2 as pb

GPT2_KEY = (
    "nnsight.modeling.transformers.TransformersModel:"
    '{"repo_id": "openai-community/gpt2", "revision": null, "task": "text-generation"}'
)
LLAMA_KEY = (
    "nnsight.modeling.transformers.TransformersModel:"
    '{"repo_id": "meta-llama/Llama-3.1-8B", "revision": null, "task": "text-generation"}'
)
NNSIGHT_VERSION = "0.8.1"
HANG = object()  # a script step: wait until the test releases the site


@dataclass(frozen=True)
class FakeIdentity:
    sub: str
    role: str = "researcher"
    groups: tuple[str, ...] = ()


class FakeAuthenticator:
    TOKENS = {
        "alice-token": FakeIdentity("alice@example.org", "researcher", ("lab-a",)),
        "bob-token": FakeIdentity("bob@example.org", "researcher"),
        "site-token": FakeIdentity("site-a", "site"),
    }

    def verify(self, token: str | None) -> FakeIdentity:
        if not token:
            raise AuthenticationError("no API key: set NDIF_API_KEY")
        identity = self.TOKENS.get(token)
        if identity is None:
            raise AuthenticationError("API key is not a valid eDIF token")
        return identity


def describe(site: str, *keys: str, state: str = "RUNNING", nnsight: str = NNSIGHT_VERSION):
    models = []
    for key in keys:
        fields = json.loads(key.split(":", 1)[1])
        models.append(
            pb.ModelDeployment(
                model_key=key,
                repo_id=fields["repo_id"],
                revision=fields.get("revision") or "",
                task=fields.get("task") or "",
                state=state,
            )
        )
    versions = {"nnsight": nnsight, "torch": torch.__version__, "transformers": "5.22.2"}
    return pb.SiteDescription(site=site, models=models, versions=versions)


def saved(values: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(values, buffer)
    return buffer.getvalue()


RESULT = saved({"x": torch.arange(5)})


def status(phase: int, position: int = 0) -> pb.ExecuteUpdate:
    return pb.ExecuteUpdate(status=pb.StatusUpdate(phase=phase, position=position))


def log(text: str) -> pb.ExecuteUpdate:
    return pb.ExecuteUpdate(log=pb.LogLine(text=text))


def error(kind: int, description: str) -> pb.ExecuteUpdate:
    return pb.ExecuteUpdate(error=pb.JobError(kind=kind, description=description))


def result(data: bytes = RESULT, chunk: int = 64, sha256: str | None = None) -> list:
    updates = [
        pb.ExecuteUpdate(chunk=pb.ResultChunk(data=data[i : i + chunk]))
        for i in range(0, len(data), chunk)
    ]
    done = pb.ResultEnd(
        total_bytes=len(data),
        sha256=sha256 or hashlib.sha256(data).hexdigest(),
        execution_s=0.25,
        peak_memory_bytes=1234,
    )
    return [*updates, pb.ExecuteUpdate(done=done)]


def happy(data: bytes = RESULT) -> list:
    return [status(pb.QUEUED, 2), status(pb.RUNNING), log("torch.Size([1, 7, 64])"), *result(data)]


Script = Callable[[pb.ExecuteRequest], Iterable]


@dataclass
class FakeSiteClient:
    """Sites that describe themselves and play scripted Execute streams.

    A script step is an `ExecuteUpdate` to yield, an exception to raise, or `HANG`.
    """

    descriptions: dict[str, pb.SiteDescription]
    scripts: dict[str, Script] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)
    executed: list[tuple[str, pb.ExecuteRequest]] = field(default_factory=list)
    cancelled: list[tuple[str, str]] = field(default_factory=list)
    release: asyncio.Event | None = None
    closed: bool = False

    def script(self, site: str, steps: Iterable) -> None:
        steps = list(steps)
        self.scripts[site] = lambda request: steps

    async def describe(self, site: str) -> pb.SiteDescription:
        if site in self.down:
            raise SiteUnavailable(f"Site {site} is unavailable (UNAVAILABLE).")
        return self.descriptions[site]

    async def execute(
        self, site: str, request: pb.ExecuteRequest
    ) -> AsyncGenerator[pb.ExecuteUpdate, None]:
        self.executed.append((site, request))
        script = self.scripts.get(site, lambda request: happy())
        for step in script(request):
            if step is HANG:
                self.release = self.release or asyncio.Event()
                await self.release.wait()
            elif isinstance(step, BaseException):
                raise step
            else:
                yield step

    async def cancel(self, site: str, job_id: str) -> bool:
        self.cancelled.append((site, job_id))
        return True

    async def close(self) -> None:
        self.closed = True


class RecordingSink:
    """A websocket's sending half that keeps every frame."""

    def __init__(self) -> None:
        self.frames: list[str | bytes] = []
        self.fail = False

    async def send_text(self, data: str) -> None:
        self._send(data)

    async def send_bytes(self, data: bytes) -> None:
        self._send(data)

    def _send(self, frame: str | bytes) -> None:
        if self.fail:
            raise ConnectionError("client went away")
        self.frames.append(frame)


def settings_for(tmp_path, **overrides) -> BrokerSettings:
    values = {
        "data_dir": tmp_path / "broker",
        "keys_dir": tmp_path / "keys",
        "sites_file": None,
        "heartbeat_s": 30.0,
        "startup_wait_s": 1.0,
        "describe_refresh_s": 60.0,
        **overrides,
    }
    return BrokerSettings(**values)


SITES = [
    SiteEntry(name="site-a", address="127.0.0.1:1"),
    SiteEntry(name="site-b", address="127.0.0.1:2"),
]


def decode(frame: str | bytes):
    """A frame as the nnsight client reads it (`RemoteBackend.parse`)."""
    from nnsight.schema.response import ResponseModel

    if isinstance(frame, bytes):
        return ResponseModel.unpickle(frame)
    return ResponseModel.model_validate_json(frame)


def load_result(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
