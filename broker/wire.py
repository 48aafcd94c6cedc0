"""The status messages the nnsight 0.8.1 client reads, built without importing nnsight.

Text frames and HTTP bodies are `ResponseModel` JSON; an inline result travels in a binary frame
in `ResponseModel.pickle()` format: `torch.save` (pickle protocol 4) of a dict holding only the
fields that were set. The client rebuilds it with `ResponseModel(**torch.load(...))`, which
accepts plain strings for `status`, so nnsight (and its `.save` mount, spec §11.4) stays out of
the broker process.
"""

from __future__ import annotations

import io
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict


class WireStatus(StrEnum):
    """The nine values of `nnsight.schema.response.Status`; anything else crashes the client."""

    RECEIVED = "RECEIVED"
    QUEUED = "QUEUED"
    PROVISIONING = "PROVISIONING"
    DEPLOYING = "DEPLOYING"
    DISPATCHED = "DISPATCHED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    ERROR = "ERROR"
    LOG = "LOG"


class StatusMessage(BaseModel):
    """One `ResponseModel`: `id` and `description` are strings, `meta` an object or null."""

    model_config = ConfigDict(frozen=True)

    id: str
    status: WireStatus
    description: str = ""
    data: str | None = None  # only a URL here; inline bytes go through `binary_frame`
    meta: dict[str, Any] | None = None

    def to_json(self) -> str:
        return self.model_dump_json()

    @property
    def terminal(self) -> bool:
        return self.status in (WireStatus.COMPLETED, WireStatus.ERROR)


def binary_frame(message: StatusMessage, result: bytes) -> bytes:
    """`message` with `data=result`, in `ResponseModel.pickle()` format."""
    import torch  # heavy; only inline deliveries need it

    fields: dict[str, Any] = {
        "id": message.id,
        "status": message.status.value,
        "description": message.description,
        "data": result,
    }
    if message.meta is not None:
        fields["meta"] = message.meta
    with io.BytesIO() as buffer:
        torch.save(fields, buffer, pickle_protocol=4)
        return buffer.getvalue()
