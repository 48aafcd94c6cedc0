"""The result store the broker's settings select: local disk (default) or S3-compatible."""

from __future__ import annotations

from broker.config import BrokerSettings
from broker.results.base import ResultStore
from broker.results.disk import DiskResultStore
from edif.clock import Clock


def open_result_store(settings: BrokerSettings, clock: Clock) -> ResultStore:
    """`result_store: disk` keeps results under `<data_dir>/results`; `s3` in the bucket."""
    if settings.result_store == "s3":
        from broker.results.s3 import S3ResultStore, s3_client  # boto3 only when chosen

        assert settings.s3_bucket is not None  # BrokerSettings requires it for s3
        spool = settings.data_dir / "results-spool"
        spool.mkdir(parents=True, exist_ok=True)
        return S3ResultStore(
            s3_client(settings),
            settings.s3_bucket,
            clock,
            settings.result_ttl_s,
            settings.max_result_bytes,
            prefix=settings.s3_prefix,
            part_bytes=settings.s3_part_bytes,
            orphan_grace_s=settings.s3_orphan_grace_s,
            spool_dir=spool,
        )
    return DiskResultStore(
        settings.data_dir / "results",
        clock,
        settings.result_ttl_s,
        settings.max_result_bytes,
        sync=settings.job_store_sync == "full",  # as durable as the job records, no more
    )
