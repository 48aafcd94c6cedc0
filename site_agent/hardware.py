"""Detect the accelerators this agent can use: CUDA, ROCm (through torch's HIP build) or CPU."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DetectedHardware:
    vendor: str  # nvidia | amd | cpu
    device_type: str
    count: int
    memory_bytes: int  # per device (for CPU: the machine's memory)


def detect() -> DetectedHardware:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        vendor = "amd" if getattr(torch.version, "hip", None) else "nvidia"
        return DetectedHardware(vendor, props.name, torch.cuda.device_count(), props.total_memory)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return DetectedHardware("cpu", "CPU", os.cpu_count() or 1, memory)
