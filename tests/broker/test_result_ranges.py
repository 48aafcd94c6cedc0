"""Result downloads: `Range` decisions (pure), and the result route over both stores."""

from __future__ import annotations

import base64
import hashlib
import os

import pytest
import result_backends
from broker_fakes import FakeAuthenticator, settings_for
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from broker.app import create_app
from broker.results import ResultFile, ResultStore
from broker.results.ranges import Partial, Unsatisfiable, Whole, plan
from edif.clock import FakeClock

backend = result_backends.backend  # the store under test, once per implementation
s3_client = result_backends.s3_client

ETAG = '"abc"'


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 10, Whole()),
        ("bytes=0-3", 10, Partial(0, 3)),
        ("bytes=4-", 10, Partial(4, 9)),
        ("bytes=-3", 10, Partial(7, 9)),
        ("bytes=-30", 10, Partial(0, 9)),  # a suffix longer than the whole: everything
        ("bytes=5-100", 10, Partial(5, 9)),  # an end past the last byte is clamped
        ("bytes=9-9", 10, Partial(9, 9)),
        ("BYTES = 2 - 4", 10, Partial(2, 4)),
        ("bytes=10-", 10, Unsatisfiable()),
        ("bytes=10-20", 10, Unsatisfiable()),
        ("bytes=-0", 10, Unsatisfiable()),
        ("bytes=0-", 0, Unsatisfiable()),
        ("bytes=-5", 0, Unsatisfiable()),
        ("bytes=5-2", 10, Whole()),  # invalid: ignored
        ("bytes=0-1,4-5", 10, Whole()),  # several ranges: we send the whole instead
        ("items=0-1", 10, Whole()),
        ("bytes=-", 10, Whole()),
        ("bytes=a-b", 10, Whole()),
        ("", 10, Whole()),
    ],
)
def test_range_plan(header, size, expected) -> None:
    assert plan(header, None, size, ETAG) == expected


def test_if_range_must_name_the_current_entity() -> None:
    assert plan("bytes=4-", ETAG, 10, ETAG) == Partial(4, 9)
    assert plan("bytes=4-", ' "abc" ', 10, ETAG) == Partial(4, 9)
    assert plan("bytes=4-", '"other"', 10, ETAG) == Whole()
    assert plan("bytes=4-", 'W/"abc"', 10, ETAG) == Whole()  # weak tags never match
    assert plan("bytes=4-", "Wed, 21 Oct 2026 07:28:00 GMT", 10, ETAG) == Whole()


@given(
    header=st.one_of(
        st.text(max_size=40),
        st.builds(
            "bytes={}-{}".format,
            st.one_of(st.just(""), st.integers(0, 2**70).map(str)),
            st.one_of(st.just(""), st.integers(0, 2**70).map(str)),
        ),
    ),
    size=st.integers(0, 2**40),
)
def test_any_range_header_gives_a_sane_plan(header: str, size: int) -> None:
    decided = plan(header, None, size, ETAG)
    if isinstance(decided, Partial):
        assert 0 <= decided.start <= decided.end < size
    else:
        assert isinstance(decided, Whole | Unsatisfiable)


def test_content_range_values() -> None:
    assert Partial(4, 9).content_range(10) == "bytes 4-9/10"
    assert Partial(4, 9).length == 6
    assert Unsatisfiable().content_range(10) == "bytes */10"


# -- the route -------------------------------------------------------------------------------


class _ResultsOnly:
    """The one `JobService` method the result route uses, over a real store."""

    def __init__(self, store: ResultStore) -> None:
        self._store = store

    def open_result(self, job_id: str, token: str) -> ResultFile:
        return self._store.open(job_id, token)


BLOB = os.urandom(3 * 1024 * 1024 + 17)  # several read chunks


@pytest.fixture
def served(backend, tmp_path, clock: FakeClock):
    store = backend.store(clock, ttl_s=60, max_bytes=len(BLOB))
    ref = store.put("job1", [BLOB[i : i + 100_000] for i in range(0, len(BLOB), 100_000)])
    app = create_app(
        _ResultsOnly(store), FakeAuthenticator(), settings_for(tmp_path), lambda: {"keys": []}
    )
    with TestClient(app, base_url="http://broker.test") as client:
        yield client, f"/results/job1/{ref.token}", ref


def test_plain_download_is_whole_with_its_checksum(served) -> None:
    client, url, ref = served
    reply = client.get(url)
    assert reply.status_code == 200
    assert reply.content == BLOB
    assert reply.headers["content-length"] == str(len(BLOB))
    assert reply.headers["accept-ranges"] == "bytes"
    assert reply.headers["cache-control"] == "no-store"
    assert reply.headers["content-type"] == "application/octet-stream"
    assert reply.headers["etag"] == f'"{ref.sha256}"'
    assert reply.headers["x-edif-sha256"] == hashlib.sha256(BLOB).hexdigest()
    digest = base64.b64encode(hashlib.sha256(BLOB).digest()).decode()
    assert reply.headers["repr-digest"] == f"sha-256=:{digest}:"


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [("bytes=0-99", 0, 99), ("bytes=1048570-", 1048570, len(BLOB) - 1), ("bytes=-17", None, None)],
)
def test_ranges_are_206_with_content_range(served, header, start, end) -> None:
    client, url, _ = served
    if start is None:
        start, end = len(BLOB) - 17, len(BLOB) - 1
    reply = client.get(url, headers={"Range": header})
    assert reply.status_code == 206
    assert reply.content == BLOB[start : end + 1]
    assert reply.headers["content-range"] == f"bytes {start}-{end}/{len(BLOB)}"
    assert reply.headers["content-length"] == str(end - start + 1)
    assert reply.headers["x-edif-sha256"] == hashlib.sha256(BLOB).hexdigest()  # of the whole


def test_resume_reassembles_the_whole(served) -> None:
    client, url, ref = served
    head = client.get(url, headers={"Range": "bytes=0-1000000"}).content
    tail = client.get(url, headers={"Range": f"bytes={len(head)}-", "If-Range": f'"{ref.sha256}"'})
    assert tail.status_code == 206
    assert hashlib.sha256(head + tail.content).hexdigest() == ref.sha256


def test_unsatisfiable_range_is_416(served) -> None:
    client, url, _ = served
    reply = client.get(url, headers={"Range": f"bytes={len(BLOB)}-"})
    assert reply.status_code == 416
    assert reply.headers["content-range"] == f"bytes */{len(BLOB)}"
    assert "outside this result" in reply.json()["detail"]


def test_stale_if_range_gets_the_whole(served) -> None:
    client, url, _ = served
    reply = client.get(url, headers={"Range": "bytes=5-", "If-Range": '"an-older-result"'})
    assert reply.status_code == 200 and reply.content == BLOB


def test_head_tells_size_and_checksum_without_a_body(served) -> None:
    client, url, ref = served
    reply = client.head(url)
    assert reply.status_code == 200 and reply.content == b""
    assert reply.headers["content-length"] == str(len(BLOB))
    assert reply.headers["etag"] == f'"{ref.sha256}"'
    partial = client.head(url, headers={"Range": "bytes=10-19"})
    assert partial.status_code == 206 and partial.headers["content-length"] == "10"


def test_wrong_token_and_expired_results(served, clock: FakeClock) -> None:
    client, url, _ = served
    wrong = client.get("/results/job1/guess", headers={"Range": "bytes=0-"})
    assert wrong.status_code == 404 and "Results are kept for 60 s" in wrong.json()["detail"]
    assert client.get("/results/..%2F..%2Fetc/x").status_code == 404
    clock.advance(61)
    expired = client.get(url)
    assert expired.status_code == 410 and "expired" in expired.json()["detail"]
