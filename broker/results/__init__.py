"""Result bytes by job id, reachable only with an unguessable, expiring capability token.

Flow: the service opens a `ResultWriter` when a site starts streaming a result, writes chunks
as they arrive, and `commit`s with the size and sha256 the site reported; only then is the
result published with a metadata record (the commit point, durable across restarts) and a
`ResultRef` (with its token) issued. The result URL `{base}/results/{job_id}/{token}`
authorises itself because the client downloads it with no headers (spec §3.4); `download`
answers it in chunks, with `Range` for resumed downloads.

Modules: `base` (interface, record, capability), `disk` (default store), `s3` (object
storage), `ranges` (Range decisions), `download` (the HTTP answer), `factory` (selection).
"""

from broker.results.base import (
    ResultFile,
    ResultIntegrityError,
    ResultRecord,
    ResultRef,
    ResultStore,
    ResultWriter,
)
from broker.results.disk import DiskResultStore

__all__ = [
    "DiskResultStore",
    "ResultFile",
    "ResultIntegrityError",
    "ResultRecord",
    "ResultRef",
    "ResultStore",
    "ResultWriter",
]
