"""Automatic placement at join: size every model from its config and pack them on the devices.

Role: glue between the site config and `site_agent.memory` / `site_agent.placement` for
`edif agent join`. Flow: for each model, read its `config.json` offline (its `source` folder,
`deploy/sites/configs/`, or the Hugging Face cache) → `estimate` in the model's dtype →
`place` all models on the detected devices (a CPU-only machine is one "cpu" device) → each
model without an explicit `device_map` in the site YAML gets the placement's `load_kwargs()`
(`device_map`, and `max_memory` when it spans GPUs); an explicit `device_map` is an override and
is kept. A model that does not fit fails the join with `PlacementError` before anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from site_agent.config import ModelConfig, SiteConfig
from site_agent.hardware import DetectedHardware
from site_agent.memory import MemoryEstimate, estimate, load_config
from site_agent.placement import Assignment, devices_from_hardware, place

CONFIG_DIRS = (Path(__file__).resolve().parent.parent / "deploy" / "sites" / "configs",)


@dataclass(frozen=True)
class PlannedModel:
    model: ModelConfig  # with the device_map/max_memory it will load with
    estimate: MemoryEstimate
    assignment: Assignment
    overridden: bool  # the site YAML named a device_map, which wins over the placement

    @property
    def where(self) -> str:
        placed = self.assignment.device_map
        if len(self.assignment.devices) > 1:
            placed = "+".join(_device(i) for i in self.assignment.devices)
        return f"{self.model.device_map} (config)" if self.overridden else placed


def plan_models(
    cfg: SiteConfig, hardware: DetectedHardware
) -> tuple[SiteConfig, list[PlannedModel]]:
    """The config with every model placed, and what was decided for the summary."""
    cpu = hardware.vendor == "cpu"
    estimates = [(m.model_key, _estimate(m, cpu)) for m in cfg.models]
    placement = place(estimates, devices_from_hardware(hardware))
    planned = [
        _planned(m, est, placement[m.model_key])
        for m, (_, est) in zip(cfg.models, estimates, strict=True)
    ]
    return cfg.model_copy(update={"models": [p.model for p in planned]}), planned


def _estimate(model: ModelConfig, cpu: bool) -> MemoryEstimate:
    config = load_config(model.load_from, revision=model.revision, config_dirs=CONFIG_DIRS)
    # No CUDA context, cuBLAS workspace or allocator slack on a CPU-only machine.
    return estimate(config, model.dtype, overhead_bytes=0) if cpu else estimate(config, model.dtype)


def _planned(model: ModelConfig, est: MemoryEstimate, assignment: Assignment) -> PlannedModel:
    if model.device_map is not None:
        return PlannedModel(model, est, assignment, overridden=True)
    kwargs = assignment.load_kwargs()
    placed = model.model_copy(
        update={"device_map": kwargs["device_map"], "max_memory": kwargs.get("max_memory")}
    )
    return PlannedModel(placed, est, assignment, overridden=False)


def _device(index: int | str) -> str:
    return "cpu" if index == "cpu" else f"cuda:{index}"
