"""The storage interface behind backups: same behaviour on a real S3 server and a local folder,
plus what happens when S3 hangs, dies or refuses the credentials."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import obstore
import pytest
from s3server import SeaweedS3, fresh_bucket, s3  # noqa: F401

from fuckbase.objectstore import (
    AlreadyExists,
    NotFound,
    ObjectStore,
    ObjectStoreError,
    open_store,
)

MB = 1024 * 1024


def s3_store(server: SeaweedS3, bucket: str, *, secret: str | None = None, op_timeout: float = 30.0) -> ObjectStore:
    return open_store(
        s3_endpoint=server.endpoint,
        s3_bucket=bucket,
        s3_access_key=server.access_key,
        s3_secret_key=server.secret_key if secret is None else secret,
        s3_region=server.region,
        local_dir=Path("/nonexistent"),
        op_timeout=op_timeout,
    )


def local_store(folder: Path) -> ObjectStore:
    return open_store(
        s3_endpoint="", s3_bucket="", s3_access_key="", s3_secret_key="", s3_region="us-east-1", local_dir=folder
    )


@pytest.fixture(params=["s3", "local"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ObjectStore]:
    """A store that is not ready yet (bucket or folder missing)."""
    if request.param == "s3":
        st = s3_store(request.getfixturevalue("s3"), request.getfixturevalue("fresh_bucket"))
    else:
        st = local_store(tmp_path / "backups")
    yield st
    await st.aclose()


async def ready(st: ObjectStore) -> ObjectStore:
    await st.ensure_ready()
    return st


async def chunks_of(data: bytes, size: int, fail_after: int | None = None) -> AsyncIterator[bytes]:
    for n, start in enumerate(range(0, len(data), size)):
        if fail_after is not None and n == fail_after:
            raise RuntimeError("producer failed")
        yield data[start : start + size]


async def read_all(st: ObjectStore, key: str, chunk_size: int = MB) -> bytes:
    return b"".join([chunk async for chunk in await st.get_stream(key, chunk_size)])


# --- both backends ----------------------------------------------------------------------------


async def test_ensure_ready_creates_bucket_or_folder(store: ObjectStore, tmp_path: Path) -> None:
    if store.kind == "s3":
        with pytest.raises(ObjectStoreError, match="does not exist"):
            await store.list("")
    else:
        assert not (tmp_path / "backups").exists()
    await store.ensure_ready()
    await store.ensure_ready()  # idempotent: the bucket exists now
    assert await store.list("") == []
    if store.kind == "local":
        assert (tmp_path / "backups").is_dir()


async def test_stream_round_trip_20mb(store: ObjectStore) -> None:
    st = await ready(store)
    data = os.urandom(20 * MB + 12345)
    # Odd chunk sizes so that parts never line up with what the producer hands over.
    written = await st.put_stream("backups/db/big.json", chunks_of(data, 700_001))
    assert written.size == len(data)
    # where the store has ETags, the one predicted from the bytes sent is the one it reports
    assert written.etag == await st.etag("backups/db/big.json")
    assert (written.etag is None) == (st.kind == "local")
    got = await read_all(st, "backups/db/big.json", chunk_size=MB)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    [info] = await st.list("backups/db/")
    assert (info.key, info.size) == ("backups/db/big.json", len(data))
    chunk_sizes = [len(c) async for c in await st.get_stream("backups/db/big.json", chunk_size=MB)]
    assert max(chunk_sizes) <= 2 * MB and sum(chunk_sizes) == len(data)
    # Overwrite with a small body: a single PUT replaces the multipart object.
    small = await st.put_stream("backups/db/big.json", chunks_of(b'{"a": 1}', 3))
    assert small.size == 8 and small.etag == await st.etag("backups/db/big.json")
    assert await st.get_bytes("backups/db/big.json") == b'{"a": 1}'


async def test_ensure_ready_outside_us_east_1(s3: SeaweedS3, fresh_bucket: str) -> None:  # noqa: F811
    """Other regions send a LocationConstraint body with the create call."""
    st = open_store(
        s3_endpoint=s3.endpoint,
        s3_bucket=fresh_bucket,
        s3_access_key=s3.access_key,
        s3_secret_key=s3.secret_key,
        s3_region="eu-west-1",
        local_dir=Path("/nonexistent"),
    )
    await st.ensure_ready()
    etag = await st.put_bytes("k", b"v")
    assert etag is not None and etag.strip('"') == hashlib.md5(b"v").hexdigest()  # S3's ETag of a single PUT
    assert [info.key for info in await st.list("")] == ["k"]


async def test_big_s3_upload_is_multipart(s3: SeaweedS3, fresh_bucket: str) -> None:  # noqa: F811
    st = await ready(s3_store(s3, fresh_bucket))
    for size in (8 * MB - 1, 8 * MB + 1, 16 * MB, 20 * MB):  # around the part size
        written = await st.put_stream("big", chunks_of(os.urandom(size), MB))
        meta = await obstore.head_async(s3.store(fresh_bucket), "big")
        assert written.etag == meta["e_tag"], size
    assert meta["e_tag"].endswith('-3"')  # multipart ETags end in -<parts>


async def test_put_bytes_create_only(store: ObjectStore) -> None:
    st = await ready(store)
    await st.put_bytes("locks/backup.lock", b"first", create_only=True)
    with pytest.raises(AlreadyExists) as err:
        await st.put_bytes("locks/backup.lock", b"second", create_only=True)
    assert "locks/backup.lock" in str(err.value)
    assert await st.get_bytes("locks/backup.lock") == b"first"
    await st.put_bytes("locks/backup.lock", b"third")  # plain put overwrites
    assert await st.get_bytes("locks/backup.lock") == b"third"
    # Racing creators: exactly one wins, and its content is what stays.
    results = await asyncio.gather(
        *(st.put_bytes("locks/race.lock", str(n).encode(), create_only=True) for n in range(10)),
        return_exceptions=True,
    )
    winners = [n for n, r in enumerate(results) if not isinstance(r, BaseException)]
    assert len(winners) == 1 and all(isinstance(r, AlreadyExists) for r in results
                                     if isinstance(r, BaseException)), results
    assert await st.get_bytes("locks/race.lock") == str(winners[0]).encode()


async def test_missing_object(store: ObjectStore) -> None:
    st = await ready(store)
    with pytest.raises(NotFound):
        await st.get_bytes("backups/nope.json")
    with pytest.raises(NotFound):
        await st.get_stream("backups/nope.json")  # raised before any chunk is handed out
    await st.delete("backups/nope.json")  # not an error


async def test_list_prefix_nested_and_delete(store: ObjectStore) -> None:
    st = await ready(store)
    keys = ["backups/a/1.json", "backups/a/2.json", "backups/ab/3.json", "backups/b/x/y.json", "other.json"]
    before = datetime.now(UTC) - timedelta(minutes=5)
    for n, key in enumerate(keys):
        await st.put_bytes(key, b"x" * (n + 1))

    async def listed(prefix: str) -> list[str]:
        return [info.key for info in await st.list(prefix)]

    assert await listed("") == sorted(keys)
    assert await listed("backups/") == keys[:4]
    assert await listed("backups/a/") == keys[:2]
    assert await listed("backups/a") == keys[:3]  # a string prefix, as in S3
    assert await listed("backups/b/") == ["backups/b/x/y.json"]
    assert await listed("nothing/") == []
    infos = {info.key: info for info in await st.list("")}
    assert [infos[k].size for k in keys] == [1, 2, 3, 4, 5]
    for info in infos.values():
        assert info.last_modified.tzinfo is not None
        assert before < info.last_modified < datetime.now(UTC) + timedelta(minutes=5)

    await st.delete("backups/a/1.json")
    assert await listed("backups/a/") == ["backups/a/2.json"]
    with pytest.raises(NotFound):
        await st.get_bytes("backups/a/1.json")
    many = [f"bulk/{n:04d}" for n in range(1005)]  # more than one DeleteObjects request holds
    for key in many:
        await st.put_bytes(key, b"")
    await st.delete_many([*many[5:], "bulk/missing"])
    assert await listed("bulk/") == many[:5]


async def test_failed_upload_leaves_nothing_visible(store: ObjectStore, tmp_path: Path) -> None:
    st = await ready(store)
    data = os.urandom(30 * MB)
    # 1 MB chunks failing after 20: several 8 MiB parts are already uploaded by then.
    with pytest.raises(RuntimeError, match="producer failed"):
        await st.put_stream("backups/db/partial.json", chunks_of(data, MB, fail_after=20))
    assert await st.list("") == []
    with pytest.raises(NotFound):
        await st.get_bytes("backups/db/partial.json")
    if store.kind == "local":
        assert [f for _, _, files in os.walk(tmp_path / "backups") for f in files] == []


@pytest.mark.parametrize("key", ["../escape", "a/../../b", "/etc/passwd", "a//b", "./a", ""])
async def test_bad_keys_rejected(store: ObjectStore, key: str) -> None:
    with pytest.raises(ValueError):
        await store.put_bytes(key, b"x")
    with pytest.raises(ValueError):
        await store.get_bytes(key)
    with pytest.raises(ValueError):
        await store.delete(key)
    with pytest.raises(ValueError):
        await store.list("../")


# --- S3 faults --------------------------------------------------------------------------------


async def test_failed_multipart_upload_is_aborted(s3: SeaweedS3, fresh_bucket: str) -> None:  # noqa: F811
    st = await ready(s3_store(s3, fresh_bucket))
    with pytest.raises(RuntimeError):
        await st.put_stream("backups/partial.json", chunks_of(os.urandom(30 * MB), MB, fail_after=20))
    # SeaweedFS keeps unfinished multipart uploads under <bucket>/.uploads/ in its filer.
    url = f"{s3.filer_url}/buckets/{fresh_bucket}/.uploads/"
    listing = httpx.get(url, headers={"Accept": "application/json"}, trust_env=False)
    assert listing.status_code in (200, 404)
    assert not (listing.json().get("Entries") if listing.status_code == 200 else None)


async def _probe_written(st: ObjectStore) -> None:
    """First write to a bucket allocates storage (up to ~1 s): keep it out of the timings."""
    await st.ensure_ready()
    await st.put_bytes("probe", b"x")
    await st.put_stream("big", chunks_of(os.urandom(10 * MB), MB))


async def _upload(st: ObjectStore) -> None:
    await st.put_stream("backups/frozen.json", chunks_of(os.urandom(20 * MB), MB))


FROZEN_OPS: dict[str, Callable[[ObjectStore], Awaitable[Any]]] = {
    "ensure_ready": lambda st: st.ensure_ready(),
    "list": lambda st: st.list("backups/"),
    "put_stream": _upload,
    "get_bytes": lambda st: st.get_bytes("probe"),
}


@pytest.mark.parametrize("op", list(FROZEN_OPS))
async def test_frozen_s3_times_out(s3: SeaweedS3, fresh_bucket: str, op: str) -> None:  # noqa: F811
    st = s3_store(s3, fresh_bucket, op_timeout=5)
    await _probe_written(st)
    s3.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(ObjectStoreError) as err:
            await FROZEN_OPS[op](st)
        elapsed = time.monotonic() - started
    finally:
        s3.thaw()
    assert err.value.kind == "timeout", err.value
    assert 4 < elapsed < 15, elapsed
    assert "timed out" in str(err.value)
    assert s3.secret_key not in str(err.value)


async def test_s3_frozen_mid_download_times_out(s3: SeaweedS3, fresh_bucket: str) -> None:  # noqa: F811
    st = s3_store(s3, fresh_bucket, op_timeout=5)
    await _probe_written(st)
    await st.put_stream("huge", chunks_of(os.urandom(64 * MB), 4 * MB))
    stream = await st.get_stream("huge", chunk_size=64 * 1024)
    await stream.__anext__()
    s3.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(ObjectStoreError) as err:
            async for _ in stream:
                pass
        elapsed = time.monotonic() - started
    finally:
        s3.thaw()
    assert err.value.kind == "timeout", err.value
    assert elapsed < 15, elapsed


async def test_s3_killed_is_unavailable_quickly(fresh_bucket: str) -> None:  # noqa: F811
    server = SeaweedS3().start()
    try:
        st = s3_store(server, fresh_bucket, op_timeout=5)
        await _probe_written(st)
        server.kill()
        ops: list[Callable[[], Awaitable[Any]]] = [
            st.ensure_ready,
            lambda: st.list(""),
            lambda: st.put_bytes("x", b"x"),
            lambda: st.get_stream("big"),
            lambda: _upload(st),
        ]
        for op in ops:
            started = time.monotonic()
            with pytest.raises(ObjectStoreError) as err:
                await op()
            assert err.value.kind == "unavailable", err.value
            assert time.monotonic() - started < 4
    finally:
        server.stop()


async def test_wrong_credentials_denied(s3: SeaweedS3, fresh_bucket: str) -> None:  # noqa: F811
    await s3_store(s3, fresh_bucket).ensure_ready()
    bad = s3_store(s3, fresh_bucket, secret="not-the-secret-" + "x" * 20)
    for op in (bad.ensure_ready, lambda: bad.list(""), lambda: bad.get_bytes("k"), lambda: bad.put_bytes("k", b"v")):
        with pytest.raises(ObjectStoreError) as err:
            await op()
        assert err.value.kind == "denied", err.value
        assert "not-the-secret" not in str(err.value)
    with pytest.raises(ObjectStoreError) as err:
        await s3_store(s3, "never-created-" + fresh_bucket[5:], secret="wrong").ensure_ready()
    assert err.value.kind == "denied"


def test_description_and_endpoint_forms(tmp_path: Path) -> None:
    def described(endpoint: str, region: str = "eu-west-1") -> str:
        st = open_store(
            s3_endpoint=endpoint,
            s3_bucket="bkt",
            s3_access_key="AKIDEXAMPLE",
            s3_secret_key="SUPERSECRET",
            s3_region=region,
            local_dir=tmp_path,
        )
        assert st.kind == "s3"
        assert "SUPERSECRET" not in st.description + repr(st)
        return st.description

    assert described("") == "s3://bkt (AWS eu-west-1)"
    assert described("minio:9000") == "s3://bkt (http://minio:9000)"
    assert described("http://127.0.0.1:8333/") == "s3://bkt (http://127.0.0.1:8333)"
    assert described("https://s3.example.com") == "s3://bkt (https://s3.example.com)"
    with pytest.raises(ValueError):
        described("ftp://example.com")
    local = local_store(tmp_path)
    assert (local.kind, local.description) == ("local", f"local folder {tmp_path}")
