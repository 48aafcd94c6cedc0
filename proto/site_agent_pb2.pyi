from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    QUEUED: _ClassVar[Phase]
    RUNNING: _ClassVar[Phase]

class ErrorKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_KIND_UNSPECIFIED: _ClassVar[ErrorKind]
    USER: _ClassVar[ErrorKind]
    REFUSED: _ClassVar[ErrorKind]
    TIMEOUT: _ClassVar[ErrorKind]
    CANCELLED: _ClassVar[ErrorKind]
    WORKER_LOST: _ClassVar[ErrorKind]
    INTERNAL: _ClassVar[ErrorKind]
    SITE_DRAINING: _ClassVar[ErrorKind]
PHASE_UNSPECIFIED: Phase
QUEUED: Phase
RUNNING: Phase
ERROR_KIND_UNSPECIFIED: ErrorKind
USER: ErrorKind
REFUSED: ErrorKind
TIMEOUT: ErrorKind
CANCELLED: ErrorKind
WORKER_LOST: ErrorKind
INTERNAL: ErrorKind
SITE_DRAINING: ErrorKind

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelDeployment(_message.Message):
    __slots__ = ("model_key", "repo_id", "revision", "task", "trust_remote_code", "state", "queue_depth", "recent_execution_s")
    MODEL_KEY_FIELD_NUMBER: _ClassVar[int]
    REPO_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    TRUST_REMOTE_CODE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    RECENT_EXECUTION_S_FIELD_NUMBER: _ClassVar[int]
    model_key: str
    repo_id: str
    revision: str
    task: str
    trust_remote_code: bool
    state: str
    queue_depth: int
    recent_execution_s: float
    def __init__(self, model_key: _Optional[str] = ..., repo_id: _Optional[str] = ..., revision: _Optional[str] = ..., task: _Optional[str] = ..., trust_remote_code: _Optional[bool] = ..., state: _Optional[str] = ..., queue_depth: _Optional[int] = ..., recent_execution_s: _Optional[float] = ...) -> None: ...

class Hardware(_message.Message):
    __slots__ = ("vendor", "device_type", "count", "memory_bytes")
    VENDOR_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    vendor: str
    device_type: str
    count: int
    memory_bytes: int
    def __init__(self, vendor: _Optional[str] = ..., device_type: _Optional[str] = ..., count: _Optional[int] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class SiteDescription(_message.Message):
    __slots__ = ("site", "institution", "models", "versions", "hardware", "capacity", "allowed_groups", "max_concurrent_jobs", "policy", "draining")
    class VersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SITE_FIELD_NUMBER: _ClassVar[int]
    INSTITUTION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_GROUPS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_JOBS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    site: str
    institution: str
    models: _containers.RepeatedCompositeFieldContainer[ModelDeployment]
    versions: _containers.ScalarMap[str, str]
    hardware: Hardware
    capacity: int
    allowed_groups: _containers.RepeatedScalarFieldContainer[str]
    max_concurrent_jobs: int
    policy: SandboxPolicy
    draining: bool
    def __init__(self, site: _Optional[str] = ..., institution: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ModelDeployment, _Mapping]]] = ..., versions: _Optional[_Mapping[str, str]] = ..., hardware: _Optional[_Union[Hardware, _Mapping]] = ..., capacity: _Optional[int] = ..., allowed_groups: _Optional[_Iterable[str]] = ..., max_concurrent_jobs: _Optional[int] = ..., policy: _Optional[_Union[SandboxPolicy, _Mapping]] = ..., draining: _Optional[bool] = ...) -> None: ...

class SandboxPolicy(_message.Message):
    __slots__ = ("name", "version", "describe_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DESCRIBE_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    describe_json: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., describe_json: _Optional[str] = ...) -> None: ...

class ExecuteRequest(_message.Message):
    __slots__ = ("job_id", "model_key", "payload", "compress", "env_json", "time_limit_s")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_KEY_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    COMPRESS_FIELD_NUMBER: _ClassVar[int]
    ENV_JSON_FIELD_NUMBER: _ClassVar[int]
    TIME_LIMIT_S_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    model_key: str
    payload: bytes
    compress: bool
    env_json: str
    time_limit_s: float
    def __init__(self, job_id: _Optional[str] = ..., model_key: _Optional[str] = ..., payload: _Optional[bytes] = ..., compress: _Optional[bool] = ..., env_json: _Optional[str] = ..., time_limit_s: _Optional[float] = ...) -> None: ...

class StatusUpdate(_message.Message):
    __slots__ = ("phase", "description", "position")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    phase: Phase
    description: str
    position: int
    def __init__(self, phase: _Optional[_Union[Phase, str]] = ..., description: _Optional[str] = ..., position: _Optional[int] = ...) -> None: ...

class LogLine(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class ResultChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class ResultEnd(_message.Message):
    __slots__ = ("total_bytes", "sha256", "execution_s", "peak_memory_bytes", "deserialize_s", "encode_s")
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_S_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DESERIALIZE_S_FIELD_NUMBER: _ClassVar[int]
    ENCODE_S_FIELD_NUMBER: _ClassVar[int]
    total_bytes: int
    sha256: str
    execution_s: float
    peak_memory_bytes: int
    deserialize_s: float
    encode_s: float
    def __init__(self, total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., execution_s: _Optional[float] = ..., peak_memory_bytes: _Optional[int] = ..., deserialize_s: _Optional[float] = ..., encode_s: _Optional[float] = ...) -> None: ...

class JobError(_message.Message):
    __slots__ = ("kind", "description")
    KIND_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    kind: ErrorKind
    description: str
    def __init__(self, kind: _Optional[_Union[ErrorKind, str]] = ..., description: _Optional[str] = ...) -> None: ...

class ExecuteUpdate(_message.Message):
    __slots__ = ("status", "log", "chunk", "done", "error")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    status: StatusUpdate
    log: LogLine
    chunk: ResultChunk
    done: ResultEnd
    error: JobError
    def __init__(self, status: _Optional[_Union[StatusUpdate, _Mapping]] = ..., log: _Optional[_Union[LogLine, _Mapping]] = ..., chunk: _Optional[_Union[ResultChunk, _Mapping]] = ..., done: _Optional[_Union[ResultEnd, _Mapping]] = ..., error: _Optional[_Union[JobError, _Mapping]] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelReply(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...
