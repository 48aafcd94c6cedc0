"""The model worker: one process holding one loaded model, running one job at a time.

Runs as a Ray actor (see `ray_pool.py`). The agent process never runs researcher code; this
process does, so it is started with no secrets in its environment (the agent holds none
either: it verifies the broker with public keys only). Every job runs on the same dedicated
thread, because nnsight's trace depth and saved set are thread-local while its source caches
and the model's interleaver are process-wide (spec §11.6).

`execute` is a generator: Ray streams each yielded item back to the agent as it is produced,
so LOG lines arrive while the block runs and a large result arrives in chunks.
Items: ("running",) · ("log", text) · ("chunk", bytes) · ("done", meta) · ("error", kind, text).
"""

from __future__ import annotations

import hashlib
import json
import queue
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from site_agent.config import ModelConfig

_END = object()


class ModelWorker:
    def __init__(self, model_json: str, chunk_bytes: int) -> None:
        import torch

        from site_agent.loading import load_model, parameter_bytes

        self.cfg = ModelConfig.model_validate_json(model_json)
        torch.set_num_threads(self.cfg.torch_threads)
        self.chunk_bytes = chunk_bytes
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edif-job")
        # Load on the job thread too: some backends bind per-thread state at load time.
        self.model = self._thread.submit(load_model, self.cfg).result()
        self.param_bytes = parameter_bytes(self.model)

    def info(self) -> dict[str, Any]:
        import os

        return {"pid": os.getpid(), "param_bytes": self.param_bytes}

    def execute(self, payload: bytes, compress: bool, env_json: str) -> Iterator[tuple]:
        updates: queue.Queue = queue.Queue()
        self._thread.submit(self._run, payload, compress, json.loads(env_json or "{}"), updates)
        while (item := updates.get()) is not _END:
            yield item

    def _run(self, payload: bytes, compress: bool, env: dict, updates: queue.Queue) -> None:
        from edif.errors import PayloadRefused, UserCodeError
        from site_agent.execution import run_request

        updates.put(("running",))
        try:
            out = run_request(self.model, payload, compress, env, lambda s: updates.put(("log", s)))
        except PayloadRefused as exc:
            updates.put(("error", "REFUSED", exc.message))
        except UserCodeError as exc:
            updates.put(("error", "USER", exc.message))
        except BaseException as exc:  # noqa: BLE001 - any failure must end the job, not the worker
            updates.put(("error", "INTERNAL", f"{type(exc).__name__}: {exc}"))
        else:
            data = memoryview(out.result_bytes)
            for start in range(0, len(data), self.chunk_bytes):
                updates.put(("chunk", bytes(data[start : start + self.chunk_bytes])))
            updates.put(
                (
                    "done",
                    {
                        "total_bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest(),
                        "execution_s": out.execution_s,
                        "peak_memory_bytes": out.peak_memory_bytes,
                    },
                )
            )
        finally:
            updates.put(_END)
