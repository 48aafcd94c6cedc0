"""Load one configured deployment with nnsight's own machinery.

The site decides what it serves: models come from the site config (Hub repo id, or a local
folder for offline use), never from request data, so a client-chosen model key can never make
the site import a module or download code (spec §8.2).
"""

from __future__ import annotations

from typing import Any

from site_agent.config import ModelConfig


def load_model(cfg: ModelConfig) -> Any:
    """A dispatched nnsight TransformersModel with real weights in eval mode."""
    import torch
    from nnsight import TransformersModel

    kwargs: dict[str, Any] = {"dispatch": True, "device_map": cfg.device_map or "auto"}
    if cfg.max_memory:
        kwargs["max_memory"] = dict(cfg.max_memory)
    if cfg.dtype != "auto":
        kwargs["dtype"] = getattr(torch, cfg.dtype)
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    # dispatch=True builds the pipeline with real weights in eval mode (spec §10 step 2).
    return TransformersModel(cfg.load_from, task=cfg.task, **kwargs)


def parameter_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model._module.parameters())
