"""Run one nnsight request payload against a loaded model (spec §10, steps 3 to 12).

`run_request` is the whole per-request procedure of a model worker: apply the request's
`env` (after checking it against the site's `PayloadPolicy`), deserialize the payload with
the restricted `AllowlistUnpickler`, check the block's source and shipped namespace against
the site's `SourcePolicy` before compiling it, run the block under nnsight's tracer with its
prints relayed line by line, collect exactly the values the client's frame would receive,
and encode them as the result bytes.

Deserializing does what `RequestModel.deserialize` does (decompress, unpickle, compile the
block under the client's filename, register it in `linecache`, set the frame's globals and
locals), split so that nothing is compiled before it is checked: shipped functions are
checked inside the unpickler before nnsight compiles them, the block after unpickling and
before `compile`, and the payload's functions become callable only once all of it passed.

Threading: call it for one request at a time per process. nnsight's trace depth and saved
set are thread-local, and its interleaver runs the block in greenlets on the calling thread,
while the source caches, `linecache`, `sys.stdout` and the model are process-wide (§11.6).
The worker uses one dedicated thread for every request.

Failures: anything wrong with the request before it runs raises a `PayloadRefused` subclass
(`EnvNotAllowed`, `GlobalNotAllowed`, `SourceRefused`, `ModelMismatch`,
`PayloadUnreadable`); an exception
from the block raises `UserCodeError` whose message is the traceback of the user's own
frames. Either way the interleaver, nnsight's per-thread state and the source caches are
reset, so the next request runs as on a fresh worker (the model keeps the last `env` applied).
"""

from __future__ import annotations

import io
import linecache
import pickle
import time
import traceback
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch
import zstandard
from nnsight.intervention.serialization import UnknownPersistentIdError
from nnsight.intervention.util import clear_shared_locals
from nnsight.tracing import globals as tracing_globals
from nnsight.tracing.tracer import Tracer, _saves, dec, inc

from edif.errors import (
    EnvNotAllowed,
    ModelMismatch,
    PayloadRefused,
    PayloadUnreadable,
    ResultNotSerializable,
    UserCodeError,
)
from site_agent.encoding import encode_result, stream_result
from site_agent.logrelay import LogRelay
from site_agent.runtime_guard import builtins_dict
from site_agent.source_policy import check_namespace, check_source, module_bindings
from site_agent.unpickler import AllowlistUnpickler, PayloadPolicy

_ENV_KEYS = frozenset({"attn_implementation", "peft"})


@dataclass(frozen=True)
class ExecutionResult:
    # What the client loads: torch.save, zstd'd iff the request was. Empty when an
    # uncompressed result was streamed to run_request's `sink` instead.
    result_bytes: bytes
    execution_s: float  # running the block (the model's forward passes included)
    peak_memory_bytes: int  # CUDA peak over all devices during the run; 0 without CUDA
    saved_names: list[str]  # the variables the client's frame receives
    deserialize_s: float = 0.0  # unpickling and checking the payload (telemetry)
    encode_s: float = 0.0  # encoding the result (telemetry)


def run_request(
    model: Any,
    payload: bytes,
    compress: bool,
    env: dict,
    emit_log: Callable[[str], None],
    policy: PayloadPolicy = PayloadPolicy(),  # noqa: B008 - frozen, so sharing it is safe
    sink: Callable[[memoryview], Any] | None = None,
) -> ExecutionResult:
    """Run one request payload on `model` (a dispatched nnsight model); see module doc.

    With a `sink`, an uncompressed result is written to it as it is encoded, not returned."""
    apply_env(model, env, policy)
    sources = _RequestSources()
    try:
        started = time.perf_counter()
        tracer = deserialize(model, payload, compress, policy)
        deserialize_s = time.perf_counter() - started
        sources.forget_cached(tracer.info.frame.f_code.co_filename)
        result, execution_s, peak = _execute(model, tracer, emit_log, sources)
    finally:
        sources.restore()
    started = time.perf_counter()
    result_bytes = _encode(result, compress, sink)
    return ExecutionResult(
        result_bytes=result_bytes,
        execution_s=execution_s,
        peak_memory_bytes=peak,
        saved_names=sorted(result),
        deserialize_s=deserialize_s,
        encode_s=time.perf_counter() - started,
    )


def apply_env(model: Any, env: dict, policy: PayloadPolicy) -> None:
    """Check the request's `env` against `policy`, then apply it to the shared model (§8.3)."""
    if not isinstance(env, dict):
        raise EnvNotAllowed(f"the request env must be a mapping, not {type(env).__name__}")
    unknown = sorted(set(env) - _ENV_KEYS)
    if unknown:
        raise EnvNotAllowed(
            f"unknown env setting(s) {', '.join(map(repr, unknown))}: this site accepts only "
            "'attn_implementation'"
        )
    if "peft" in env:
        raise EnvNotAllowed(
            f"this site allows no adapters, but the request asks for the PEFT adapter "
            f"{env['peft']!r}; run the model without one"
        )
    attn = env.get("attn_implementation")
    if attn is not None and attn not in policy.attn_implementations:
        allowed = ", ".join(sorted(policy.attn_implementations))
        raise EnvNotAllowed(f"attention implementation {attn!r} is not allowed here ({allowed})")
    try:
        model._remoteable_set_env(env)
    except ValueError as exc:  # the model cannot switch to that implementation
        raise EnvNotAllowed(str(exc)) from exc


def deserialize(model: Any, payload: bytes, compress: bool, policy: PayloadPolicy) -> Tracer:
    """Rebuild the request's tracer, bound to `model`, or raise a `PayloadRefused`.

    `RequestModel.deserialize`, step by step (see module doc): unpickle with the allowlist
    (shipped functions are source-checked there), check the block's namespaces and source,
    release the payload's functions, and only then compile the block.
    """
    if compress:
        _check_frame_size(payload, policy)
    persistent = model._remoteable_persistent_objects()
    try:
        blob = zstandard.ZstdDecompressor().decompress(payload) if compress else payload
        unpickler = AllowlistUnpickler(io.BytesIO(blob), persistent, policy=policy)
        loaded = unpickler.load()
    except PayloadRefused:
        raise
    except UnknownPersistentIdError as exc:
        raise ModelMismatch(
            f"the payload references {exc.args[0]!r}, which this site's model does not have: "
            "the client's module tree differs from the site's (check the transformers version, "
            "trust_remote_code and adapters)"
        ) from exc
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # garbage, truncated, bad zstd, a broken pickle: all refused
        raise PayloadUnreadable(_unreadable(exc, compress)) from exc
    tracer, source, glbls, variables = _request_parts(loaded)
    frame = tracer.info.frame
    filename = frame.f_code.co_filename
    check_namespace(glbls, "the block's globals", policy.source)
    check_namespace(variables, "the block's variables", policy.source)
    check_source(source, filename, policy.source, module_bindings(glbls, variables))
    unpickler.release(loaded, [glbls, variables])
    try:
        code = compile(source, filename, "exec")
    except (SyntaxError, ValueError) as exc:  # parses, but does not compile (`return` at top)
        raise PayloadUnreadable(_unreadable(exc, compress)) from exc
    tracer.info.code = code.replace(co_name=frame.f_code.co_name)
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    # Layer 2: the block's code looks its builtins up here (`exec` would insert the real
    # ones into nnsight's Scope, a copy of the locals, were the key missing there).
    restricted = builtins_dict(policy.source)
    glbls["__builtins__"] = restricted
    variables["__builtins__"] = restricted
    frame.f_globals = glbls
    frame.f_locals = variables
    return tracer


def _request_parts(loaded: Any) -> tuple[Tracer, str, dict, dict]:
    """(tracer, block source, globals, locals) from an unpickled payload, or refuse it."""
    refused = PayloadUnreadable("the request payload does not hold an nnsight trace")
    try:
        tracer, (source, glbls, variables) = loaded
        code = tracer.info.frame.f_code
        names = (code.co_filename, code.co_name)
    except Exception:  # another shape altogether (a shipped function is inert here: KeyError)
        raise refused from None
    if not (
        isinstance(tracer, Tracer)
        and isinstance(source, str)
        and all(type(name) is str for name in names)
        and type(glbls) is dict
        and type(variables) is dict
    ):
        raise refused
    return tracer, source, glbls, variables


def _check_frame_size(payload: bytes, policy: PayloadPolicy) -> None:
    # The decompressor allocates the size the frame header claims, so check it first.
    try:
        size = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as exc:
        raise PayloadUnreadable(_unreadable(exc, compress=True)) from exc
    if size > policy.max_payload_bytes:
        raise PayloadUnreadable(
            f"the request payload decompresses to {size} bytes, more than this site's limit "
            f"of {policy.max_payload_bytes}"
        )


def _unreadable(exc: BaseException, compress: bool) -> str:
    form = "zstd-compressed" if compress else "uncompressed"
    return (
        f"the request payload could not be read as an {form} nnsight request: "
        f"{type(exc).__name__}: {exc}"
    )


def _execute(
    model: Any, tracer: Tracer, emit_log: Callable[[str], None], sources: _RequestSources
) -> tuple[dict, float, int]:
    """Run the block (§10 steps 7 to 11); returns (saved values, seconds, peak bytes)."""
    frame = tracer.info.frame
    recorder = _RecordingLocals(frame.f_locals)
    frame.f_locals = recorder
    _reset_peak_memory()
    error = None
    inc()  # depth 1: the block's push keeps only saved values, as on the client
    started = time.perf_counter()
    try:
        with LogRelay(emit_log):
            tracer.execute(tracer.info.code)
        saved = _saves()  # read before dec(), which clears it
        result = {k: v for k, v in recorder.pushed.items() if id(v) in saved}
    except KeyboardInterrupt:  # the runtime cancelling the job, not the user's code
        raise
    except BaseException as exc:  # SystemExit from exit() in a block must not end the worker
        # Format here, while the shipped source is still in linecache; keep no reference to
        # the exception, whose frames hold the run's activations.
        error = format_user_traceback(exc, sources.files())
    finally:
        execution_s = time.perf_counter() - started
        dec()
        model.interleaver.cancel()  # unwinds workers a failed run left parked
        clear_shared_locals()
    if error is not None:
        raise UserCodeError(error)
    return result, execution_s, _peak_memory()


class _RecordingLocals(dict):
    """Frame locals that remember what nnsight pushes into them.

    `nnsight.tracing.util.push` hands results to the frame with exactly one `update()` per
    block, so the union of those mappings is what the client's frame would receive.
    """

    def __init__(self, initial: dict) -> None:
        super().__init__(initial)
        self.pushed: dict[str, Any] = {}

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        incoming = dict(other, **kwargs)
        self.pushed.update(incoming)
        super().update(incoming)


def format_user_traceback(exc: BaseException, user_files: Collection[str]) -> str:
    """The traceback of `exc` limited to frames of the request's own code, as the user sees it.

    nnsight's `clean_traceback` only drops nnsight's frames and would still show the site's
    torch and transformers paths; keeping only frames compiled from the request's sources (the
    block under the client's filename, shipped functions under `[name:line] path`) shows the
    user their own lines and nothing of the site. Chained exceptions are cut the same way.
    """
    summary = traceback.TracebackException.from_exception(exc)
    _keep_frames(summary, user_files, set())
    return "".join(summary.format()).rstrip("\n")


def _keep_frames(
    summary: traceback.TracebackException, files: Collection[str], seen: set[int]
) -> None:
    if id(summary) in seen:
        return
    seen.add(id(summary))
    summary.stack = traceback.StackSummary.from_list(
        [frame for frame in summary.stack if frame.filename in files]
    )
    for linked in (summary.__cause__, summary.__context__, *(summary.exceptions or ())):
        if linked is not None:
            _keep_frames(linked, files, seen)


class _RequestSources:
    """The source-cache entries a request brings, so they cannot outlive it (§11.5).

    `deserialize` registers the block under the client's filename in `linecache`, and each
    shipped function under `[name:line] path`. nnsight's `SOURCES` and `BLOCKS` memoize
    traces by filename: a stale entry from an earlier request with the same filename would
    run that request's code for this one's inner (session) traces. So the request's files are
    dropped from those caches before the run and after it, and `linecache` is put back as it
    was before the request.
    """

    def __init__(self) -> None:
        self._before = dict(linecache.cache)
        self._filenames: frozenset[str] = frozenset()

    def files(self) -> frozenset[str]:
        """The filenames this request compiled code under (known once it is deserialized)."""
        return self._filenames

    def forget_cached(self, block_filename: str) -> None:
        # Deserializing registered the block and every shipped function; nothing the request
        # compiles later (inner traces) uses another filename. Fixed here, so a site file that
        # a warning pulls into linecache during the run never counts as the user's.
        self._filenames = frozenset({block_filename} | self._changed())
        _forget_traces(self._filenames)

    def restore(self) -> None:
        files = self._filenames | self._changed()  # also what a failed deserialize left
        _forget_traces(files)
        for name in files:
            if name in self._before:
                linecache.cache[name] = self._before[name]
            else:
                linecache.cache.pop(name, None)

    def _changed(self) -> set[str]:
        return {k for k, v in linecache.cache.items() if self._before.get(k) is not v}


def _forget_traces(filenames: Collection[str]) -> None:
    for name in filenames:
        tracing_globals.SOURCES.pop(name, None)
    for key in [key for key in tracing_globals.BLOCKS if key[0] in filenames]:
        del tracing_globals.BLOCKS[key]


def _encode(result: dict, compress: bool, sink: Callable[[memoryview], Any] | None) -> bytes:
    try:
        if sink is not None and not compress:
            stream_result(result, sink)
            return b""
        return encode_result(result, compress)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        names = ", ".join(_unpicklable_names(result)) or "?"
        raise ResultNotSerializable(
            f"the saved value(s) {names} cannot be sent back: {type(exc).__name__}: {exc}"
        ) from None


def _unpicklable_names(result: dict) -> list[str]:
    """The saved names whose values pickle refuses (only called once encoding failed)."""
    names = []
    for name, value in sorted(result.items()):
        try:
            pickle.dump(value, _Discard(), protocol=4)
        except Exception:
            names.append(name)
    return names


class _Discard(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return len(data)


def _reset_peak_memory() -> None:
    if torch.cuda.is_available():
        for device in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(device)


def _peak_memory() -> int:
    # Summed over devices: a model split across GPUs peaks on each of them.
    if not torch.cuda.is_available():
        return 0
    return sum(int(torch.cuda.max_memory_allocated(d)) for d in range(torch.cuda.device_count()))
