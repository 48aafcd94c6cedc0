"""Typed errors shared by the broker, the site agent and the CLI.

Every failure a user or operator can cause or see is one of these, raised where it is
detected and mapped once to an HTTP status (broker front) and a gRPC status code (agent).
Messages are written for the person who reads them: what went wrong and what to do.
"""

from __future__ import annotations

from typing import ClassVar


class EdifError(Exception):
    """Base of all expected failures; anything else is a bug and maps to 500/INTERNAL."""

    http_status: ClassVar[int] = 500
    grpc_code: ClassVar[str] = "INTERNAL"  # a grpc.StatusCode name; grpc stays optional here

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(EdifError):
    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class AuthenticationError(EdifError):
    """No credential, or one that does not verify (signature, expiry, issuer, audience)."""

    http_status = 401
    grpc_code = "UNAUTHENTICATED"


class PermissionDenied(EdifError):
    http_status = 403
    grpc_code = "PERMISSION_DENIED"


class NotFound(EdifError):
    http_status = 404
    grpc_code = "NOT_FOUND"


class UnknownModel(NotFound):
    """The model key names nothing any site hosts."""


class ClientVersionError(EdifError):
    """The client's nnsight version is not served by any site."""

    http_status = 426
    grpc_code = "FAILED_PRECONDITION"


class PayloadTooLarge(EdifError):
    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"


class Unavailable(EdifError):
    """No site can take the job right now (all down or unreachable)."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class ConfigError(EdifError):
    """A site or process configuration is invalid; raised once, at start-up."""


class PayloadRefused(BadRequest):
    """A request payload was refused before anything ran (e.g. a global not on the allowlist)."""


class SiteUnavailable(Unavailable):
    """A site could not be reached, or its stream broke; another site may still take the job."""


class ResultExpired(NotFound):
    """A result URL that was valid once but whose retention period has passed."""

    http_status = 410


class PayloadUnreadable(PayloadRefused):
    """A request payload could not be decompressed, unpickled or compiled (garbage, truncated)."""


class GlobalNotAllowed(PayloadRefused):
    """A request payload names a Python global the site's payload policy does not admit."""


class ModelMismatch(PayloadRefused):
    """A request payload references model modules this deployment does not have.

    The client's module tree differs from the site's: another transformers version, a
    `trust_remote_code` mismatch, or an adapter the site did not apply.
    """


class EnvNotAllowed(PayloadRefused):
    """A request's `env` asks for something the site does not allow (an adapter, an unknown key)."""


class UserCodeError(EdifError):
    """The request's own code raised while it ran on the site.

    The message is the remote traceback, limited to the user's frames, ending with the
    exception line; the client shows it verbatim as its `RemoteError`.
    """

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class ResultNotSerializable(UserCodeError):
    """A value the block saved cannot be pickled for the trip back to the client."""


class CatalogUnavailable(Unavailable):
    """The site catalog (Consul) could not be reached, refused the call or answered nonsense."""


class UnknownSite(NotFound):
    """The catalog holds no registration for this site: never registered, deregistered, or
    reaped after missing heartbeats. The agent should register again."""


class SiteRecordTooLarge(ConfigError):
    """A site's catalog record does not fit Consul's service metadata limits (too many models
    or groups, or a value too long); trim the site configuration."""


class SiteRecordUnreadable(EdifError):
    """A catalog entry's metadata does not decode to a site record (foreign writer, other
    schema version, truncated). The broker skips such entries and logs them."""


class PlacementError(ConfigError):
    """The site's models do not fit its devices: the message names each model that does not
    fit, its memory estimate and the devices; host fewer models or add devices."""


class SourceRefused(PayloadRefused):
    """Code in a request (the block or a shipped function) uses a construct the site's source
    policy does not allow; refused before anything was compiled or run.

    The message names the construct, its line and the policy (name and version).
    """

    def __init__(self, message: str, lineno: int | None = None) -> None:
        super().__init__(message)
        self.lineno = lineno


class QuotaExceeded(EdifError):
    """A fair-use quota refused the request (rate, concurrent jobs, GPU-seconds budget, result
    size). The message names what was exceeded, the current use, the limit and when it resets."""

    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"


class BrokerUnreachable(Unavailable):
    """A site agent could not reach the broker it joins (network, TLS, or a 5xx reply)."""


class AuditError(EdifError):
    """The audit log could not be read or written (disk, database); the message names it."""


class SandboxViolation(PermissionError):
    """Request code reached something the site's restricted runtime refuses (an import, a
    builtin or an attribute the source policy forbids) while it ran; raised inside the block,
    so the user sees it in their traceback."""


class WorkerContaminated(UserCodeError):
    """A job changed state the site's model worker shares with later jobs (a module attribute,
    a model parameter, a hook). Its result is withheld and the worker is replaced."""
