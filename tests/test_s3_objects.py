"""The object interface (fcsnap/store/backends/objects.py) behaves the same on both implementations:
a store directory and a bucket on a real S3 server."""

from __future__ import annotations

from pathlib import Path

import pytest
from s3_helpers import Bucket

from fcsnap.errors import FcsnapError
from fcsnap.store.backends.objects import Conflict, LocalObjects, ObjectStore
from fcsnap.store.backends.s3 import S3Objects, parse_s3_url


@pytest.fixture(params=["local", "s3"])
def objects(request: pytest.FixtureRequest, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> ObjectStore:
    if request.param == "local":
        return LocalObjects(tmp_path / "store")
    bucket: Bucket = request.getfixturevalue("bucket")
    for key, value in bucket.server.env().items():
        monkeypatch.setenv(key, value)
    return S3Objects(parse_s3_url(bucket.url()))


def test_whole_ranges_listing_and_delete(objects: ObjectStore, tmp_path: Path) -> None:
    assert objects.get("a/x") is None and objects.head("a/x") is None
    objects.put("a/x", b"0123456789", None)
    data, etag = objects.get("a/x")
    assert data == b"0123456789" and etag
    assert objects.get_range("a/x", 3, 4) == b"3456"
    assert objects.head("a/x").size == 10
    big = tmp_path / "big"
    big.write_bytes(bytes(range(256)) * (70 << 12))  # over 17 MiB: several parts
    objects.upload("a/big", big)
    at = (9 << 20) - 3  # across the first part boundary
    assert objects.get_range("a/big", at, 6) == big.read_bytes()[at:at + 6]
    writer = objects.writer("b/streamed")
    for _ in range(5):
        writer.write(b"z" * (3 << 20))
    assert objects.head("b/streamed") is None  # nothing until close
    writer.close()
    assert objects.head("b/streamed").size == 15 << 20
    assert [o.key for o in objects.list("a/")] == ["a/big", "a/x"]
    objects.delete("a/x")
    objects.delete("a/x")  # deleting what is gone is fine
    assert [o.key for o in objects.list()] == ["a/big", "b/streamed"]


def test_an_aborted_writer_leaves_nothing(objects: ObjectStore) -> None:
    writer = objects.writer("c/aborted")
    writer.write(b"y" * (20 << 20))
    writer.abort()
    assert objects.head("c/aborted") is None and objects.list("c/") == []


def test_conditional_puts(objects: ObjectStore) -> None:
    first = objects.put("vms/web", b"one\n", None)
    with pytest.raises(Conflict):
        objects.put("vms/web", b"two\n", None)  # exists already
    with pytest.raises(Conflict):
        objects.put("vms/web", b"two\n", "not-its-etag")
    try:
        second = objects.put("vms/web", b"two\n", first)
    except Conflict:  # a server without If-Match (Ceph 16): RemoteStore handles this
        pytest.skip("this S3 server refuses every If-Match (conditional updates)")
    assert objects.get("vms/web") == (b"two\n", second)
    with pytest.raises(Conflict):
        objects.put("vms/web", b"three\n", first)  # the ETag of a replaced version
    assert objects.get("vms/web")[0] == b"two\n"


def test_a_range_past_the_end_is_an_error(objects: ObjectStore) -> None:
    objects.put("d/x", b"abc", None)
    with pytest.raises((FcsnapError, OSError)):
        objects.get_range("d/x", 1, 10)


def test_a_limited_read_stops_after_the_limit(objects: ObjectStore, tmp_path: Path) -> None:
    """`get(key, limit)` (markers, pointers, leases) gives at most `limit` + 1 bytes: the caller
    sees the object is too big; a small one comes whole with its ETag."""
    big = tmp_path / "big"
    big.write_bytes(bytes(range(251)) * (1 << 16))  # 16 MiB, not a byte repeated
    objects.upload("vms/huge", big)
    assert objects.get("vms/huge", 4096)[0] == big.read_bytes()[:4097]
    objects.put("vms/small", b"0123", None)
    assert objects.get("vms/small", 4096) == objects.get("vms/small")
    assert objects.get("vms/absent", 4096) is None
