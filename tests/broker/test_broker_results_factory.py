"""Which result store the broker's settings select, and that S3 credentials stay secret."""

from __future__ import annotations

import logging

import pytest
import result_backends
from broker_fakes import settings_for
from pydantic import ValidationError

from broker.results import DiskResultStore
from broker.results.factory import open_result_store
from broker.results.s3 import S3ResultStore
from edif.clock import FakeClock

s3_client = result_backends.s3_client

SECRET = "s3cr3t-never-logged"


def test_disk_is_the_default(tmp_path, clock: FakeClock) -> None:
    settings = settings_for(tmp_path)
    store = open_result_store(settings, clock)
    assert isinstance(store, DiskResultStore)
    store.put("job1", [b"abc"])
    assert (settings.data_dir / "results" / "job1.result").read_bytes() == b"abc"


def test_s3_is_selected_by_settings(tmp_path, clock: FakeClock, s3_client, caplog) -> None:
    s3_client.create_bucket(Bucket="edif-selected")
    settings = settings_for(
        tmp_path,
        result_store="s3",
        s3_bucket="edif-selected",
        s3_endpoint_url=s3_client.meta.endpoint_url,
        s3_prefix="broker-a/",
        s3_access_key_id="testing",
        s3_secret_access_key=SECRET,
    )
    assert SECRET not in repr(settings) and SECRET not in str(settings.model_dump())
    with caplog.at_level(logging.DEBUG):
        store = open_result_store(settings, clock)
        ref = store.put("job1", [b"abc"])
        assert b"".join(store.open("job1", ref.token).chunks()) == b"abc"
    assert isinstance(store, S3ResultStore)
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket="edif-selected")["Contents"]]
    assert sorted(keys) == ["broker-a/job1.meta.json", "broker-a/job1.result"]
    assert SECRET not in caplog.text


def test_s3_needs_a_bucket_and_sane_parts(tmp_path) -> None:
    with pytest.raises(ValidationError, match="s3_bucket"):
        settings_for(tmp_path, result_store="s3")
    with pytest.raises(ValidationError, match="s3_part_bytes"):
        settings_for(tmp_path, result_store="s3", s3_bucket="b", s3_part_bytes=1024)


def test_an_unreachable_object_store_is_503(tmp_path, clock: FakeClock) -> None:
    import boto3
    from botocore.config import Config
    from moto.server import ThreadedMotoServer

    from edif.errors import Unavailable
    from edif.up import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )
    client.create_bucket(Bucket="edif-gone")
    store = S3ResultStore(client, "edif-gone", clock, 3600, 1000, orphan_grace_s=0)
    ref = store.put("job1", [b"abc"])
    server.stop()
    with pytest.raises(Unavailable, match="cannot be reached") as caught:
        store.open("job1", ref.token)
    assert caught.value.http_status == 503
    with pytest.raises(Unavailable):
        S3ResultStore(client, "edif-gone", clock, 3600, 1000)


def test_the_whole_broker_delivers_from_s3(tmp_path, s3_client) -> None:
    """A job through `build_app` with `result_store: s3`: checked, stored, served by URL."""
    import json

    from broker_fakes import GPT2_KEY, RESULT, FakeSiteClient, decode, describe
    from fastapi.testclient import TestClient

    from auth.keys import KeyStore
    from auth.roles import Role
    from auth.tokens import TokenIssuer
    from broker.config import BrokerSettings
    from broker.main import build_app

    s3_client.create_bucket(Bucket="edif-whole")
    (tmp_path / "sites.yaml").write_text(
        'sites:\n  - name: site-a\n    address: "127.0.0.1:50051"\n'
    )
    settings = BrokerSettings(
        data_dir=tmp_path / "data",
        keys_dir=tmp_path / "keys",
        sites_file=tmp_path / "sites.yaml",
        inline_max_bytes=0,
        result_store="s3",
        s3_bucket="edif-whole",
        s3_endpoint_url=s3_client.meta.endpoint_url,
        s3_access_key_id="testing",
        s3_secret_access_key=SECRET,
    )
    sites = FakeSiteClient({"site-a": describe("site-a", GPT2_KEY)})
    token = TokenIssuer(KeyStore(tmp_path / "keys")).issue(
        "alice@example.org", Role.RESEARCHER, 600
    )
    with TestClient(build_app(settings, site_client=sites)) as client:
        with client.websocket_connect("/subscribe", headers={"ndif-api-key": token}) as ws:
            session_id = json.loads(ws.receive_text())["session_id"]
            reply = client.post(
                "/request",
                data={"data": json.dumps({"model_key": GPT2_KEY, "session_id": session_id})},
                files={"blob": ("request", b"blob", "application/octet-stream")},
                headers={"ndif-api-key": token, "nnsight-version": "0.8.1"},
            )
            assert reply.status_code == 200, reply.text
            while (frame := decode(ws.receive_text())).status not in ("COMPLETED", "ERROR"):
                pass
        assert frame.status == "COMPLETED", frame.description
        download = client.get(frame.data)
        assert download.status_code == 200 and download.content == RESULT
        resumed = client.get(frame.data, headers={"Range": "bytes=10-"})
        assert resumed.status_code == 206 and resumed.content == RESULT[10:]
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket="edif-whole")["Contents"]]
    assert len(keys) == 2 and all(k.startswith("results/") for k in keys)
