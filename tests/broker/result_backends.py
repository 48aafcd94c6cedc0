"""Both result stores behind one test harness: local disk, and S3 on a real S3 API (moto's
server bound to 127.0.0.1), so every store test runs against each implementation."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from broker.results import DiskResultStore, ResultStore
from broker.results.s3 import MIN_PART_BYTES, S3ResultStore
from edif.clock import Clock
from edif.up import free_port

PART = MIN_PART_BYTES
_buckets = itertools.count()


class DiskBackend:
    name = "disk"

    def __init__(self, tmp_path: Path, sync: bool = True) -> None:
        self.root = tmp_path / "results"
        self.sync = sync  # False: the no-fsync mode (a job store with synchronous=NORMAL)

    def store(self, clock: Clock, ttl_s: float = 3600, max_bytes: int = 1000) -> ResultStore:
        return DiskResultStore(self.root, clock, ttl_s, max_bytes, sync=self.sync)

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()) if self.root.exists() else []

    def raw(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def plant(self, name: str, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / name).write_bytes(data)


class S3Backend:
    name = "s3"

    def __init__(self, client: Any, tmp_path: Path) -> None:
        self.client = client
        self.bucket = f"edif-results-{next(_buckets)}"
        self.prefix = "results/"
        self.spool = tmp_path / "spool"
        self.spool.mkdir()
        client.create_bucket(Bucket=self.bucket)

    def store(
        self, clock: Clock, ttl_s: float = 3600, max_bytes: int = 1000, grace_s: float = 0.0
    ) -> ResultStore:
        return S3ResultStore(
            self.client,
            self.bucket,
            clock,
            ttl_s,
            max_bytes,
            prefix=self.prefix,
            part_bytes=PART,
            orphan_grace_s=grace_s,
            spool_dir=self.spool,
        )

    def leftovers(self) -> list[str]:
        listed = self.client.list_objects_v2(Bucket=self.bucket).get("Contents", [])
        uploads = self.client.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])
        names = [item["Key"].removeprefix(self.prefix) for item in listed]
        return sorted(names + [f"upload:{u['Key'].removeprefix(self.prefix)}" for u in uploads])

    def raw(self, name: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"].read()

    def plant(self, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data)


@pytest.fixture(scope="session")
def s3_client():
    """A boto3 client for a moto S3 server on a free loopback port (dummy credentials)."""
    import boto3
    from botocore.config import Config
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{port}",
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=Config(s3={"addressing_style": "path"}),
        )
    finally:
        server.stop()


@pytest.fixture(params=["disk", "disk-nosync", "s3"])
def backend(request, tmp_path):
    if request.param.startswith("disk"):
        return DiskBackend(tmp_path, sync=request.param == "disk")
    return S3Backend(request.getfixturevalue("s3_client"), tmp_path)
