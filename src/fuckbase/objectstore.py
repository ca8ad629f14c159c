"""Where backups live: one small async interface over S3-compatible storage or a local folder.

The backup code only sees `ObjectStore`; `open_store` picks the backend from the settings.
Every failure surfaces as `ObjectStoreError` with a `kind` the caller can act on, and every
network step is bounded by `op_timeout`, so a dead or frozen S3 never hangs a backup.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import itertools
import os
import re
import secrets
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, TypeVar
from urllib.parse import urlsplit

import httpx
import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    BaseError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)
from obstore.store import S3Store as _ObstoreS3

if TYPE_CHECKING:
    from obstore import GetOptions
    from obstore.store import RetryConfig, S3Config

T = TypeVar("T")

# Multipart part size and parts in flight: memory per upload stays near 8 MiB * (4 + 1).
_PART_SIZE = 8 * 1024 * 1024
_PARTS_IN_FLIGHT = 4
BULK_DELETE = 1000
# Local writes are batched so each thread hop moves a useful amount of data.
_LOCAL_WRITE_BATCH = 1024 * 1024
# Temp files of unfinished local writes; `list` never reports them.
_TMP_SUFFIX = ".fbtmp"
STALE_SECONDS = 3600.0  # a temp file or backup claim this old was left by a crash
# A download may legitimately outlast op_timeout (slow consumer, big backup); stalls are
# caught by the read timeout instead, so the whole-request limit is only a last resort.
_DOWNLOAD_REQUEST_LIMIT = timedelta(hours=6)


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: datetime  # UTC, tz-aware


class Written(NamedTuple):
    """What an upload sent: its size, and the ETag the store will report for those bytes when
    that is predictable (S3's MD5 of the object, or of its parts' MD5s), else None."""

    size: int
    etag: str | None


class ObjectStoreError(Exception):
    """A storage operation failed; the message says what was being done and why, never secrets.

    kind: "unavailable" (connection refused, DNS), "timeout", "denied" (403, bad signature)
    or "error" (anything else).
    """

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind


class NotFound(ObjectStoreError):
    """The object does not exist."""


class AlreadyExists(ObjectStoreError):
    """A create-only write found the object already there."""


class ObjectStore(Protocol):
    description: str
    kind: str

    async def ensure_ready(self) -> None: ...

    async def put_stream(
        self, key: str, chunks: AsyncIterable[bytes], content_type: str = "application/json"
    ) -> Written: ...

    async def etag(self, key: str) -> str | None:
        """The ETag the store reports for the object (None where stores have none)."""

    async def put_bytes(self, key: str, data: bytes, *, create_only: bool = False) -> str | None:
        """One write of the whole object; the ETag the store answered (None where stores have none)."""

    async def get_stream(self, key: str, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]: ...

    async def get_bytes(self, key: str) -> bytes: ...

    async def list(self, prefix: str) -> builtins.list[ObjectInfo]: ...

    async def delete(self, key: str) -> None: ...

    async def delete_many(self, keys: Sequence[str]) -> None:
        """Deletes these objects (missing ones are fine), in as few requests as the store allows."""

    async def aclose(self) -> None: ...


def open_store(
    *,
    s3_endpoint: str,
    s3_bucket: str,
    s3_access_key: str,
    s3_secret_key: str,
    s3_region: str,
    local_dir: Path,
    op_timeout: float = 30.0,
) -> ObjectStore:
    """The S3 store when a bucket is configured, else the local folder."""
    if s3_bucket:
        return S3ObjectStore(
            endpoint=s3_endpoint,
            bucket=s3_bucket,
            access_key=s3_access_key,
            secret_key=s3_secret_key,
            region=s3_region,
            op_timeout=op_timeout,
        )
    return LocalObjectStore(local_dir)


class _PartDigests:
    """The MD5s S3 computes over an upload as obstore sends it: one PUT below the part size,
    else parts of exactly that size. S3 reports the MD5 of a single PUT as its ETag, and for
    a multipart upload the MD5 of the parts' MD5s with the part count."""

    def __init__(self, part_size: int) -> None:
        self._part_size = part_size
        self._done: list[bytes] = []
        self._part = hashlib.md5(usedforsecurity=False)
        self._in_part = 0
        self.size = 0

    def update(self, data: bytes) -> None:
        self.size += len(data)
        view = memoryview(data)
        while view:
            take = min(len(view), self._part_size - self._in_part)
            self._part.update(view[:take])
            self._in_part += take
            view = view[take:]
            if self._in_part == self._part_size:
                self._done.append(self._part.digest())
                self._part, self._in_part = hashlib.md5(usedforsecurity=False), 0

    def etag(self) -> str:
        if self.size < self._part_size:
            return f'"{self._part.hexdigest()}"'
        digests = self._done + ([self._part.digest()] if self._in_part else [])
        return f'"{hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"'


def _check_key(key: str) -> None:
    """Keys are relative slash-separated paths: both backends accept exactly the same set."""
    if not key or "\x00" in key or key.startswith("/") or "\\" in key:
        raise ValueError(f"invalid object key {key!r}")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"invalid object key {key!r}")


def _check_prefix(prefix: str) -> None:
    if prefix:
        _check_key(prefix[:-1] if prefix.endswith("/") else prefix)


# ---------------------------------------------------------------------------------------------
# S3


def _normalize_endpoint(endpoint: str) -> str:
    """'host:port' means plain http (as in docker-compose setups); URLs are kept as given."""
    endpoint = endpoint.strip().rstrip("/")
    if endpoint and "://" not in endpoint:
        endpoint = "http://" + endpoint
    if endpoint:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.username:
            shown = f"{parts.scheme}://{parts.hostname}"  # never echo a password given in the URL
            raise ValueError(f"S3 endpoint must be host:port or an http(s) URL without credentials, not {shown}")
    return endpoint


_XML_CODE = re.compile(r"<Code>([^<]{1,100})</Code>")
_STATUS = re.compile(r"status code: (\d{3})")


def _s3_failure(exc: BaseException, op_timeout: float) -> tuple[str, str]:
    """(kind, short reason) for an obstore error, read from its text since it has no fields."""
    text = str(exc)
    code_match = _XML_CODE.search(text)
    code = code_match.group(1) if code_match else ""
    status_match = _STATUS.search(text)
    status = int(status_match.group(1)) if status_match else 0
    detail = " ".join(filter(None, (f"HTTP {status}" if status else "", code)))
    if isinstance(exc, PermissionDeniedError | UnauthenticatedError) or status in (401, 403):
        return "denied", f"S3 denied access ({detail or 'HTTP 403'})"
    if "TimedOut" in text or "kind: Timeout" in text:
        return "timeout", f"S3 timed out after {op_timeout:g}s"
    if "dns error" in text:
        return "unavailable", "the S3 host name does not resolve"
    if "ConnectionRefused" in text:
        return "unavailable", "S3 refused the connection"
    if "kind: Connect" in text:
        return "unavailable", "cannot connect to S3"
    if not status and ("connection closed" in text.lower() or "ConnectionReset" in text
                       or "error sending request" in text):
        return "unavailable", "S3 closed the connection"
    if detail:
        return "error", f"S3 answered {detail}"
    return "error", f"S3 error: {text.splitlines()[0][:300]}"


RANGE_BYTES = 1 << 20  # per request of a download
RANGES_AHEAD = 4  # requests under way while the data is consumed


class S3ObjectStore:
    """S3 (or compatible) bucket through obstore; bucket creation through a presigned request."""

    kind = "s3"

    def __init__(
        self,
        *,
        endpoint: str,
        bucket: str,
        access_key: str,
        secret_key: str,
        region: str,
        op_timeout: float = 30.0,
    ) -> None:
        self._bucket = bucket
        self._region = region or "us-east-1"
        self._op_timeout = op_timeout
        endpoint = _normalize_endpoint(endpoint)
        if endpoint:
            parts = urlsplit(endpoint)
            self.description = f"s3://{bucket} ({parts.scheme}://{parts.netloc})"
        else:
            self.description = f"s3://{bucket} (AWS {self._region})"
        config: S3Config = {
            "region": self._region,
            # Custom servers rarely have wildcard DNS for buckets; AWS prefers virtual hosts.
            "virtual_hosted_style_request": not endpoint,
        }
        if endpoint:
            config["endpoint"] = endpoint
        if access_key:  # else obstore's usual chain: environment, profile, instance role
            config["access_key_id"] = access_key
            config["secret_access_key"] = secret_key
        connect = timedelta(seconds=min(5.0, op_timeout))
        budget = timedelta(seconds=op_timeout)
        # Few quick retries inside the same budget: refused connections fail in about a
        # second, and a frozen server costs one op_timeout, never obstore's default 3 minutes.
        retry: RetryConfig = {
            "max_retries": 3,
            "retry_timeout": budget,
            "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2), "base": 2},
        }
        allow_http = endpoint.startswith("http://")
        self._store = _ObstoreS3(
            bucket,
            config=config,
            client_options={"allow_http": allow_http, "timeout": budget, "connect_timeout": connect},
            retry_config=retry,
        )
        self._download_store = _ObstoreS3(
            bucket,
            config=config,
            client_options={
                "allow_http": allow_http,
                "timeout": _DOWNLOAD_REQUEST_LIMIT,
                "read_timeout": budget,
                "connect_timeout": connect,
            },
            retry_config=retry,
        )

    def __repr__(self) -> str:
        return f"S3ObjectStore({self.description})"

    def _error(self, action: str, exc: BaseException) -> ObjectStoreError:
        if isinstance(exc, TimeoutError):
            return ObjectStoreError(f"cannot {action}: S3 timed out after {self._op_timeout:g}s", "timeout")
        if "NoSuchBucket" in str(exc):  # obstore reports it as a missing object or as generic
            return ObjectStoreError(f"cannot {action}: bucket {self._bucket} does not exist")
        if isinstance(exc, FileNotFoundError):
            return NotFound(f"cannot {action}: no such object")
        if isinstance(exc, AlreadyExistsError | PreconditionError):
            return AlreadyExists(f"cannot {action}: it already exists")
        kind, reason = _s3_failure(exc, self._op_timeout)
        return ObjectStoreError(f"cannot {action}: {reason}", kind)

    async def _call(self, action: str, aw: Awaitable[T]) -> T:
        """One bounded network step; obstore errors become ObjectStoreError, others pass."""
        try:
            async with asyncio.timeout(self._op_timeout):
                return await aw
        except (TimeoutError, OSError, BaseError) as exc:  # obstore raises plain OSError too
            raise self._error(action, exc) from exc

    async def ensure_ready(self) -> None:
        """Create the bucket unless it exists; obstore has no call for it, so presign one."""
        action = f"prepare bucket {self._bucket}"
        try:
            async with asyncio.timeout(self._op_timeout):
                status, _ = await self._bucket_request("HEAD", b"")
                if status == 200:
                    return
                if status in (401, 403):
                    raise ObjectStoreError(f"cannot {action}: S3 denied access (HTTP {status})", "denied")
                if status != 404:
                    raise ObjectStoreError(f"cannot {action}: S3 answered HTTP {status}")
                status, code = await self._bucket_request("PUT", self._create_bucket_body())
        except TimeoutError:
            raise ObjectStoreError(f"cannot {action}: S3 timed out after {self._op_timeout:g}s", "timeout") from None
        except httpx.TimeoutException as exc:
            raise ObjectStoreError(f"cannot {action}: S3 timed out ({type(exc).__name__})", "timeout") from None
        except httpx.ConnectError as exc:
            raise ObjectStoreError(f"cannot {action}: cannot connect to S3 ({exc})", "unavailable") from None
        except httpx.HTTPError as exc:
            raise ObjectStoreError(f"cannot {action}: {type(exc).__name__}: {exc}") from None
        except BaseError as exc:
            raise self._error(action, exc) from exc
        if status == 200 or code == "BucketAlreadyOwnedByYou":  # the latter: lost a creation race
            return
        detail = " ".join(filter(None, (f"HTTP {status}", code)))
        if status in (401, 403):
            raise ObjectStoreError(f"cannot {action}: it does not exist and S3 denied creating it ({detail})", "denied")
        raise ObjectStoreError(f"cannot {action}: creating it failed ({detail})")

    def _create_bucket_body(self) -> bytes:
        """us-east-1 takes no body; every other AWS region wants its name as the constraint."""
        if self._region == "us-east-1":
            return b""
        return (
            '<CreateBucketConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"<LocationConstraint>{self._region}</LocationConstraint></CreateBucketConfiguration>"
        ).encode()

    async def _bucket_request(self, method: Literal["HEAD", "PUT"], body: bytes) -> tuple[int, str]:
        """Send a request on the bucket root, signed by obstore (presigned URLs sign no payload)."""
        url = await obstore.sign_async(self._store, method, "", timedelta(minutes=5))
        timeout = httpx.Timeout(self._op_timeout, connect=min(5.0, self._op_timeout))
        async with httpx.AsyncClient(timeout=timeout, transport=httpx.AsyncHTTPTransport(retries=2)) as client:
            response = await client.request(method, url, content=body)
        match = _XML_CODE.search(response.text)
        return response.status_code, match.group(1) if match else ""

    async def put_stream(
        self, key: str, chunks: AsyncIterable[bytes], content_type: str = "application/json"
    ) -> Written:
        """Buffered multipart upload: each write and the final commit get their own time budget,
        so producing the data may take as long as it needs; on any failure the upload is aborted."""
        _check_key(key)
        action = f"write {key}"
        writer = obstore.open_writer_async(
            self._store,
            key,
            attributes={"Content-Type": content_type},
            buffer_size=_PART_SIZE,
            max_concurrency=_PARTS_IN_FLIGHT,
        )
        parts = _PartDigests(_PART_SIZE)
        try:
            async for chunk in chunks:
                if chunk:
                    await self._call(action, writer.write(chunk))
                    parts.update(chunk)
            await self._call(action, writer.close())
        except BaseException as exc:
            # The writer's context-manager exit is obstore's only route to AbortMultipartUpload.
            with suppress(Exception):
                async with asyncio.timeout(min(self._op_timeout, 10.0)):
                    await writer.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return Written(parts.size, parts.etag())

    async def etag(self, key: str) -> str | None:
        _check_key(key)
        meta = await self._call(f"read {key}", obstore.head_async(self._store, key))
        return meta.get("e_tag")

    async def put_bytes(self, key: str, data: bytes, *, create_only: bool = False) -> str | None:
        """Single PUT; create_only sends If-None-Match: * so exactly one concurrent writer wins."""
        _check_key(key)
        put = obstore.put_async(
            self._store, key, data, mode="create" if create_only else "overwrite", use_multipart=False
        )
        result = await self._call(f"write {key}", put)
        return result.get("e_tag")

    async def get_stream(self, key: str, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        """The object in ranges of RANGE_BYTES, one request each, RANGES_AHEAD of them under
        way while the data is consumed: memory stays bounded however fast the store sends (one
        streaming request let the client buffer the whole object). Every range must come from
        the same version of the object (If-Match on its ETag). NotFound surfaces here."""
        _check_key(key)
        action = f"read {key}"
        meta = await self._call(action, obstore.head_async(self._store, key))
        return self._ranges(action, key, int(meta["size"]), meta.get("e_tag"))

    async def _ranges(self, action: str, key: str, size: int, etag: str | None) -> AsyncIterator[bytes]:
        async def fetch(start: int) -> bytes:
            options: GetOptions = {"range": (start, min(size, start + RANGE_BYTES))}
            if etag:
                options["if_match"] = etag
            result = await obstore.get_async(self._download_store, key, options=options)
            return bytes(await result.bytes_async())

        starts = iter(range(0, size, RANGE_BYTES))
        ahead: deque[asyncio.Future[bytes]] = deque()
        try:
            for start in itertools.islice(starts, RANGES_AHEAD):
                ahead.append(asyncio.ensure_future(self._call(action, fetch(start))))
            while ahead:
                chunk = await ahead.popleft()
                for start in itertools.islice(starts, 1):
                    ahead.append(asyncio.ensure_future(self._call(action, fetch(start))))
                yield chunk
        finally:
            for f in ahead:
                f.cancel()

    async def get_bytes(self, key: str) -> bytes:
        _check_key(key)
        action = f"read {key}"

        async def fetch() -> bytes:
            result = await obstore.get_async(self._store, key)
            return bytes(await result.bytes_async())

        return await self._call(action, fetch())

    async def list(self, prefix: str) -> builtins.list[ObjectInfo]:
        """Plain string-prefix semantics as in S3 (obstore lists whole path segments only)."""
        _check_prefix(prefix)
        folder = prefix.rpartition("/")[0]
        action = f"list {prefix or 'all objects'}"
        metas = await self._call(action, obstore.list(self._store, folder or None).collect_async())
        found = [
            ObjectInfo(meta["path"], meta["size"], meta["last_modified"].astimezone(UTC))
            for meta in metas
            if meta["path"].startswith(prefix)
        ]
        return sorted(found, key=lambda info: info.key)

    async def delete(self, key: str) -> None:
        _check_key(key)
        with suppress(NotFound):
            await self._call(f"delete {key}", obstore.delete_async(self._store, key))

    async def delete_many(self, keys: Sequence[str]) -> None:
        for key in keys:
            _check_key(key)
        for start in range(0, len(keys), BULK_DELETE):  # S3's DeleteObjects takes 1,000 keys
            batch = list(keys[start : start + BULK_DELETE])
            with suppress(NotFound):
                await self._call(f"delete {len(batch)} objects", obstore.delete_async(self._store, batch))

    async def aclose(self) -> None:
        """obstore keeps no resources that need closing; present for the interface."""


# ---------------------------------------------------------------------------------------------
# Local folder


class LocalObjectStore:
    """Objects as files under one folder; writes are atomic (temp file, fsync, rename)."""

    kind = "local"

    def __init__(self, root: Path) -> None:
        self._root = Path(root).absolute()
        self.description = f"local folder {self._root}"
        self._swept = False

    def __repr__(self) -> str:
        return f"LocalObjectStore({self._root})"

    def _path(self, key: str) -> Path:
        _check_key(key)
        return self._root.joinpath(*key.split("/"))

    async def _io(self, action: str, func: Callable[..., T], *args: Any, reading: bool = False) -> T:
        """File work off the event loop; OS errors become ObjectStoreError (a missing file is
        NotFound only when reading: for a write it means the folder vanished)."""
        try:
            return await asyncio.to_thread(func, *args)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            if reading:
                raise NotFound(f"cannot {action}: no such object") from exc
            raise ObjectStoreError(f"cannot {action}: {exc.strerror}") from exc
        except FileExistsError as exc:
            raise AlreadyExists(f"cannot {action}: it already exists") from exc
        except PermissionError as exc:
            raise ObjectStoreError(f"cannot {action}: {exc.strerror}", "denied") from exc
        except OSError as exc:
            raise ObjectStoreError(f"cannot {action}: {exc.strerror or exc}") from exc

    async def ensure_ready(self) -> None:
        """Creates the folder; the first time, also removes the temp files of writes that a
        crash cut short (an hour old at least: never a write under way)."""
        await self._io(f"create {self._root}", lambda: self._root.mkdir(parents=True, exist_ok=True))
        if not self._swept:
            self._swept = True
            await self._io(f"clean {self._root}", _remove_stale_temp_files, self._root, STALE_SECONDS)

    def _temp_path(self, path: Path) -> Path:
        return path.with_name(f".{path.name}.{secrets.token_hex(6)}{_TMP_SUFFIX}")

    async def put_stream(
        self, key: str, chunks: AsyncIterable[bytes], content_type: str = "application/json"
    ) -> Written:
        """Stream into a temp file next to the target, then rename: readers never see half a file."""
        path = self._path(key)
        action = f"write {key}"
        tmp = self._temp_path(path)
        file = await self._io(action, _open_new, tmp)
        written = 0
        try:
            batch = bytearray()
            async for chunk in chunks:
                batch += chunk
                written += len(chunk)
                if len(batch) >= _LOCAL_WRITE_BATCH:
                    await self._io(action, file.write, batch)
                    batch = bytearray()
            await self._io(action, _finish, file, batch, tmp, path)
        except BaseException:
            with suppress(OSError):
                await asyncio.shield(asyncio.to_thread(_discard, file, tmp))
            raise
        return Written(written, None)

    async def etag(self, key: str) -> str | None:
        return None

    async def put_bytes(self, key: str, data: bytes, *, create_only: bool = False) -> str | None:
        """create_only links the finished temp file into place: atomic across processes."""
        path = self._path(key)
        await self._io(f"write {key}", _write_file, self._temp_path(path), path, data, create_only)
        return None

    async def get_stream(self, key: str, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        action = f"read {key}"
        file = await self._io(action, open, self._path(key), "rb", reading=True)
        return self._chunks(action, file, chunk_size)

    async def _chunks(self, action: str, file: Any, chunk_size: int) -> AsyncIterator[bytes]:
        try:
            while chunk := await self._io(action, file.read, chunk_size, reading=True):
                yield chunk
        finally:
            file.close()

    async def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        return await self._io(f"read {key}", path.read_bytes, reading=True)

    async def list(self, prefix: str) -> builtins.list[ObjectInfo]:
        _check_prefix(prefix)
        return await self._io(f"list {prefix or 'all objects'}", _list_files, self._root, prefix)

    async def delete(self, key: str) -> None:
        path = self._path(key)
        with suppress(NotFound):
            await self._io(f"delete {key}", path.unlink, reading=True)

    async def delete_many(self, keys: Sequence[str]) -> None:
        for key in keys:
            await self.delete(key)

    async def aclose(self) -> None:
        """Nothing stays open between calls; present for the interface."""


def _open_new(tmp: Path) -> Any:
    tmp.parent.mkdir(parents=True, exist_ok=True)
    return open(tmp, "xb")  # noqa: SIM115 - closed by _finish or _discard


def _fsync_dir(folder: Path) -> None:
    """Make a rename or link durable: the directory entry itself must reach the disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _finish(file: Any, tail: bytes, tmp: Path, path: Path) -> None:
    file.write(tail)
    file.flush()
    os.fsync(file.fileno())
    file.close()
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _discard(file: Any, tmp: Path) -> None:
    file.close()
    tmp.unlink(missing_ok=True)


def _write_file(tmp: Path, path: Path, data: bytes, create_only: bool) -> None:
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "xb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if create_only:
            os.link(tmp, path)  # fails with FileExistsError if another writer got there first
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale_temp_files(root: Path, older_than: float) -> None:
    cutoff = datetime.now(UTC).timestamp() - older_than
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            with suppress(FileNotFoundError):
                if name.endswith(_TMP_SUFFIX) and os.stat(path).st_mtime < cutoff:
                    os.unlink(path)


def _list_files(root: Path, prefix: str) -> builtins.list[ObjectInfo]:
    """Walk only the folder the prefix points into, then filter by the whole prefix."""
    folder = prefix.rpartition("/")[0]
    top = root.joinpath(*folder.split("/")) if folder else root
    found = []
    for dirpath, _, filenames in os.walk(top):
        rel = Path(dirpath).relative_to(root).as_posix()
        for name in filenames:
            if name.endswith(_TMP_SUFFIX):
                continue
            key = name if rel == "." else f"{rel}/{name}"
            if not key.startswith(prefix):
                continue
            try:
                st = os.stat(os.path.join(dirpath, name))
            except FileNotFoundError:  # deleted while we walked
                continue
            found.append(ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC)))
    return sorted(found, key=lambda info: info.key)
