"""Place a site's models on its devices from their memory estimates.

Role: the packing half of automatic GPU placement (federation issue §5); `site_agent.memory`
sizes each model, this decides where each one goes, replacing the pilot's trial and error.

Flow: `place(models, devices)` is a pure function:
1. Each device offers `free_bytes x headroom` (what is already in use stays in use, and the
   rest of the free memory is slack for allocator fragmentation and estimate error).
2. Models are taken largest first (first-fit decreasing; ties by name, so the result is
   deterministic), and each goes to the first device, in index order, with room for its
   single-device total: small models share a GPU.
3. A model that fits no single device's remaining room spans the fewest contiguous devices
   whose room covers its weights and runtime margin plus, per device, a context, the forward
   pass's transient and one unsplittable block of slack (`span_bytes`; earliest such window
   first). It gets `device_map="auto"` and a `max_memory` per device for accelerate that
   bounds what accelerate puts there, so the rest of those devices stays free for smaller
   models.
4. A model that fits nowhere is reported, with every other one that does not fit, in one
   PlacementError naming the model, its estimate and the devices.

A CPU-only site passes one `Device("cpu", ...)` with the machine's memory; everything then goes
on "cpu" if it fits. When GPUs are listed, a "cpu" device is ignored: no model is offloaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from edif.errors import ConfigError, PlacementError
from site_agent.hardware import DetectedHardware
from site_agent.memory import GB, MemoryEstimate

DeviceIndex = int | Literal["cpu"]


@dataclass(frozen=True)
class Device:
    """One device as the placement sees it: a GPU index (ROCm GPUs too) or "cpu"."""

    index: DeviceIndex
    total_bytes: int
    free_bytes: int

    @property
    def name(self) -> str:
        return "cpu" if self.index == "cpu" else f"cuda:{self.index}"


@dataclass(frozen=True)
class Assignment:
    """Where one model goes, and the from_pretrained arguments that put it there."""

    name: str
    estimate: MemoryEstimate
    devices: tuple[DeviceIndex, ...]
    bytes_per_device: tuple[int, ...]  # what the placement reserved on each of `devices`
    max_memory: Mapping[DeviceIndex, int] | None = None  # only when the model spans devices

    @property
    def device_map(self) -> str:
        if len(self.devices) > 1:
            return "auto"
        return "cpu" if self.devices[0] == "cpu" else f"cuda:{self.devices[0]}"

    def load_kwargs(self) -> dict[str, object]:
        """`device_map` (and `max_memory` when spanning) for from_pretrained / TransformersModel."""
        kwargs: dict[str, object] = {"device_map": self.device_map}
        if self.max_memory is not None:
            kwargs["max_memory"] = dict(self.max_memory)
        return kwargs


@dataclass(frozen=True)
class Placement:
    """Every model's assignment, in the order the models were given."""

    assignments: tuple[Assignment, ...]
    remaining: Mapping[DeviceIndex, int]  # room left per device after placement

    def __getitem__(self, name: str) -> Assignment:
        for assignment in self.assignments:
            if assignment.name == name:
                return assignment
        raise KeyError(name)

    def describe(self) -> str:
        lines = []
        for a in self.assignments:
            where = "+".join(_device_name(i) for i in a.devices)
            lines.append(f"{a.name} -> {where} ({_gb(sum(a.bytes_per_device))})")
        return "\n".join(lines)


def place(
    models: Sequence[tuple[str, MemoryEstimate]],
    devices: Sequence[Device],
    headroom: float = 0.9,
) -> Placement:
    """Assign each (name, estimate) to a device or a span of devices; see the module docstring."""
    if not 0 < headroom <= 1:
        raise ConfigError(f"headroom must be in (0, 1], got {headroom}")
    names = [name for name, _ in models]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"models listed twice: {sorted({n for n in names if names.count(n) > 1})}"
        )
    pool = _pool(devices)
    room = {d.index: int(d.free_bytes * headroom) for d in pool}
    placed: dict[str, Assignment] = {}
    failed: list[tuple[str, MemoryEstimate]] = []

    for name, est in sorted(models, key=lambda m: (-m[1].total_bytes, m[0])):
        assignment = _single(name, est, pool, room) or _span(name, est, pool, room)
        if assignment is None:
            failed.append((name, est))
        else:
            placed[name] = assignment
    if failed:
        raise PlacementError(_failure_message(failed, pool, room, headroom, len(models)))
    return Placement(tuple(placed[name] for name in names), dict(room))


def devices_from_hardware(hardware: DetectedHardware) -> list[Device]:
    """Devices from what `site_agent.hardware.detect` found, all memory taken as free."""
    if hardware.vendor == "cpu":
        return [Device("cpu", hardware.memory_bytes, hardware.memory_bytes)]
    return [Device(i, hardware.memory_bytes, hardware.memory_bytes) for i in range(hardware.count)]


def span_bytes(est: MemoryEstimate, devices: int) -> int:
    """What a model needs across `devices` devices: `est.bytes_on(devices)` plus one
    unsplittable block of slack per device (see `_span`)."""
    return est.bytes_on(devices) + devices * est.largest_module_bytes


def _pool(devices: Sequence[Device]) -> list[Device]:
    indices = [d.index for d in devices]
    if len(set(indices)) != len(indices):
        raise ConfigError(f"devices listed twice: {indices}")
    gpus = sorted((d for d in devices if d.index != "cpu"), key=lambda d: d.index)
    pool = gpus or [d for d in devices if d.index == "cpu"]
    if not pool:
        raise PlacementError("no devices to place models on (no GPU and no CPU memory given)")
    return pool


def _single(
    name: str,
    est: MemoryEstimate,
    pool: list[Device],
    room: dict[DeviceIndex, int],
) -> Assignment | None:
    for device in pool:
        if room[device.index] >= est.total_bytes:
            room[device.index] -= est.total_bytes
            return Assignment(name, est, (device.index,), (est.total_bytes,))
    return None


def _span(
    name: str, est: MemoryEstimate, pool: list[Device], room: dict[DeviceIndex, int]
) -> Assignment | None:
    """The first window of the fewest contiguous devices that holds the model, or None.

    accelerate's max_memory bounds the weights it puts on each device, and it fills devices in
    order with whole decoder layers: a device can end up to one largest block short of its
    budget. So each device's weight budget is its share of the weights (in proportion to its
    room) plus that block. With the device's context, the forward pass's transient and its
    share of the KV cache and saved states, that is what the placement reserves there; the
    rest of the device stays free for other models.
    """
    slack = est.overhead_bytes + est.largest_module_bytes + est.transient_bytes
    payload = est.weight_bytes + est.runtime_bytes - est.transient_bytes
    for width in range(2, len(pool) + 1):
        for start in range(len(pool) - width + 1):
            window = [d.index for d in pool[start : start + width]]
            usable = [room[i] - slack for i in window]
            if min(usable) <= 0 or sum(usable) < payload:
                continue
            total = sum(usable)
            runtime = payload - est.weight_bytes  # KV cache and saved states, divided
            budgets: dict[DeviceIndex, int] = {}
            reserved: list[int] = []
            for i, share in ((i, u / total) for i, u in zip(window, usable, strict=True)):
                weights = -int(-est.weight_bytes * share // 1)  # rounded up: cover all
                budgets[i] = weights + est.largest_module_bytes
                reserved.append(min(room[i], weights + -int(-runtime * share // 1) + slack))
                room[i] -= reserved[-1]
            return Assignment(name, est, tuple(window), tuple(reserved), budgets)
    return None


def _failure_message(
    failed: list[tuple[str, MemoryEstimate]],
    pool: list[Device],
    room: Mapping[DeviceIndex, int],
    headroom: float,
    total_models: int,
) -> str:
    devices = ", ".join(f"{d.name} {_gb(d.free_bytes)} free of {_gb(d.total_bytes)}" for d in pool)
    lines = [
        f"{len(failed)} of {total_models} models do not fit this site's devices "
        f"({devices}; placement uses {headroom:.0%} of free memory):"
    ]
    for name, est in failed:
        left = ", ".join(f"{_device_name(i)} {_gb(r)}" for i, r in room.items())
        spanned = f" or {_gb(span_bytes(est, len(pool)))} across all {len(pool)}"
        lines.append(
            f"model {name!r} needs {_gb(est.total_bytes)} on one device"
            f"{spanned if len(pool) > 1 else ''} [{est.describe()}]; "
            f"room left after placing the others: {left}"
        )
    return "\n".join(lines)


def _device_name(index: DeviceIndex) -> str:
    return "cpu" if index == "cpu" else f"cuda:{index}"


def _gb(n: int) -> str:
    return f"{n / GB:.2f} GB"
