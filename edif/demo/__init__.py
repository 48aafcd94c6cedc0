"""Demo models and the researcher-side helper for using them offline.

`load("edif-demo/tiny-gpt2")` returns an nnsight `TransformersModel` for a demo model, ready for
`remote=True`: the weights are built locally and nnsight's Hub-id cache is seeded, because
`to_model_key()` otherwise asks the Hugging Face Hub for the canonical repo id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edif.demo.models import TINY_GPT2, TINY_LLAMA, ensure_all, ensure_model, model_dir

__all__ = ["TINY_GPT2", "TINY_LLAMA", "ensure_all", "ensure_model", "load", "model_dir"]


def load(repo_id: str, *, dispatch: bool = False, home: Path | None = None, **kwargs: Any):
    """A TransformersModel (text-generation) for a demo model; its remote key names `repo_id`.

    dispatch=False gives the meta model researchers use with remote=True; dispatch=True loads
    the weights for a local run (the reference remote results are compared against).
    """
    from nnsight import TransformersModel
    from nnsight.modeling import huggingface

    path = str(ensure_model(repo_id, home))
    huggingface._ID_CACHE[path] = repo_id
    return TransformersModel(path, task="text-generation", dispatch=dispatch, **kwargs)
