"""nnsight model keys: parse the untrusted string a client sends into a tuple the router matches.

A key is `<wrapper class import path>:<suffix>` (protocol spec §8). The suffix is JSON for the
Hugging Face wrappers (`{"repo_id": ..., "revision": ..., "task": ...}`) and a raw repo id for
VLLM. Routing matches the parsed tuple, never the raw string, so spelling differences (spacing,
key order, `revision: null` vs `"main"`) do not create phantom deployments. Nothing here imports
what the key names: keys are data until a site's own configuration says otherwise.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from edif.errors import BadRequest

MAX_KEY_CHARS = 4096
DEFAULT_REVISION = "main"

_CLASS_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_JSON_FIELDS = {"repo_id", "revision", "task", "trust_remote_code"}
# The VLLM form's bare repo id (or path): no whitespace, quotes or brackets.
_RAW_REPO = re.compile(r"^[\w./~:@+-]+$")


@dataclass(frozen=True)
class ModelKey:
    cls_path: str
    repo_id: str
    revision: str | None = None
    task: str | None = None
    trust_remote_code: bool = False
    raw_suffix: bool = False  # VLLM form: the suffix was a bare repo id, not JSON

    @property
    def match_tuple(self) -> tuple[str, str, str, str | None, bool]:
        """What two keys must share to name the same deployment (`None` revision is `main`)."""
        return (
            self.cls_path,
            self.repo_id,
            self.revision or DEFAULT_REVISION,
            self.task or None,
            self.trust_remote_code,
        )

    def matches(self, other: ModelKey) -> bool:
        return self.match_tuple == other.match_tuple

    def describe(self) -> str:
        """A short human label: `repo_id (Class, task, ...)`, enough to tell deployments apart."""
        details = [self.cls_path.rsplit(".", 1)[-1]]
        if self.task:
            details.append(self.task)
        if self.revision and self.revision != DEFAULT_REVISION:
            details.append(f"revision {self.revision}")
        if self.trust_remote_code:
            details.append("trust_remote_code")
        return f"{self.repo_id} ({', '.join(details)})"


def parse_model_key(key: object) -> ModelKey:
    """Parse a client's model key; anything malformed is a `BadRequest` saying what is wrong."""
    if not isinstance(key, str) or not key:
        raise BadRequest("model_key must be a non-empty string")
    if len(key) > MAX_KEY_CHARS:
        raise BadRequest(f"model_key is longer than {MAX_KEY_CHARS} characters")
    cls_path, sep, suffix = key.partition(":")
    if not sep or not suffix:
        raise BadRequest(f"model_key {_clip(key)!r} is not '<class path>:<model>'")
    if not _CLASS_PATH.match(cls_path):
        raise BadRequest(f"model_key class path {_clip(cls_path)!r} is not a dotted import path")
    if suffix.lstrip().startswith("{"):
        return _parse_json_suffix(cls_path, suffix)
    return _parse_raw_suffix(cls_path, suffix)


def _parse_json_suffix(cls_path: str, suffix: str) -> ModelKey:
    try:
        fields = json.loads(suffix)
    except (ValueError, RecursionError) as error:  # RecursionError: nesting too deep
        raise BadRequest(f"model_key suffix is not valid JSON: {error}") from error
    if not isinstance(fields, dict):
        raise BadRequest("model_key suffix must be a JSON object")
    unknown = set(fields) - _JSON_FIELDS
    if unknown:
        raise BadRequest(f"model_key has unsupported fields: {', '.join(sorted(unknown))}")
    repo_id = fields.get("repo_id")
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise BadRequest("model_key needs a non-empty string repo_id")
    revision = _optional_str(fields, "revision")
    task = _optional_str(fields, "task")
    trust = fields.get("trust_remote_code", False)
    if not isinstance(trust, bool):
        raise BadRequest("model_key trust_remote_code must be true or false")
    return ModelKey(cls_path, repo_id, revision or None, task or None, trust)


def _parse_raw_suffix(cls_path: str, suffix: str) -> ModelKey:
    if not _RAW_REPO.match(suffix):
        raise BadRequest(f"model_key suffix {_clip(suffix)!r} is neither JSON nor a repo id")
    return ModelKey(cls_path, suffix, raw_suffix=True)


def _optional_str(fields: dict, name: str) -> str | None:
    value = fields.get(name)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"model_key {name} must be a string or null")
    return value


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
