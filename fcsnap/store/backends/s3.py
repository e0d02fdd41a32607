"""A store in S3 (or any S3-compatible server): `s3://BUCKET/PREFIX`, through obstore.

Configured as AWS tools are: AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3), AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN), AWS_REGION (or AWS_DEFAULT_REGION); an http://
endpoint (a local server) is allowed as given. obstore, not boto3: measured here it imports in
2-3 ms against boto3's 105-160 ms, makes its client in 30 ms against 520 ms (every command
pays both), and read random ranges 10-25% faster.

Every failure becomes one FcsnapError line naming the store; retries are bounded
(RETRY_TIMEOUT), so an unreachable endpoint fails within seconds, not minutes.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcsnap.errors import FcsnapError, redact
from fcsnap.options import S3_SCHEME
from fcsnap.store.backends.objects import Conflict, ObjectInfo
from fcsnap.store.format.locks import stop_point

SCHEME = S3_SCHEME
BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
CONNECT_TIMEOUT = "5s"
REQUEST_TIMEOUT = "120s"
RETRY_TIMEOUT = datetime.timedelta(seconds=15)
MAX_RETRIES = 4
PART_SIZE = 8 << 20  # multipart part size: big enough for throughput
PARTS_IN_FLIGHT = 4  # parts uploading at once (memory: this many parts and one filling)
# Sent on every request, multipart parts included (which carry no object attributes): a
# server that compresses what it cannot name (SeaweedFS gzips every chunk of a body sent
# without a type, or as application/octet-stream, when its first 128 bytes compress) then
# stores diffs as they are. Measured here: a gzipped raw diff made each 4 MiB range GET 3.5x
# slower (the server inflates the chunk) and its upload 30% slower.
CONTENT_TYPE = "application/x-fcsnap"
# Credentials a deployment may hand over other than by keys in the environment (obstore then
# finds them); without any of these and without keys, a command fails at once instead of
# waiting on instance metadata that is not there.
OTHER_CREDENTIALS = (
    "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI", "FCSNAP_S3_INSTANCE_CREDENTIALS",
)


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # no leading or trailing '/'; may be empty

    @property
    def url(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"


def is_s3_url(text: str) -> bool:
    return text.startswith(SCHEME)


def parse_s3_url(text: str) -> S3Location:
    """`s3://BUCKET[/PREFIX]`; FcsnapError saying what is wrong."""
    rest = text[len(SCHEME):]
    bucket, _, prefix = rest.partition("/")
    if not BUCKET.fullmatch(bucket) or ".." in bucket:
        raise FcsnapError(
            f"invalid store URL {text!r}: bucket {bucket!r} is not an S3 bucket name "
            "(3-63 characters: lower-case letters, digits, '.', '-')"
        )
    prefix = prefix.strip("/")
    parts = prefix.split("/") if prefix else []
    if any(p in ("", ".", "..") for p in parts):
        raise FcsnapError(f"invalid store URL {text!r}: empty, '.' or '..' path segment")
    return S3Location(bucket, prefix)


def _env(*names: str) -> str | None:
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return None


def _config(location: S3Location) -> dict[str, Any]:
    config: dict[str, Any] = {"region": _env("AWS_REGION", "AWS_DEFAULT_REGION") or "us-east-1"}
    endpoint = _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    if endpoint is not None:
        if not re.match(r"https?://[^/\s]+", endpoint):
            raise FcsnapError(f"AWS_ENDPOINT_URL {redact(endpoint)!r} is not an http:// or "
                              "https:// URL")
        config["endpoint"] = endpoint
    if _env("AWS_UNSIGNED_PAYLOAD") is None and not config.get("endpoint", "").startswith(
        "http://"
    ):
        # Over TLS the body is protected already; signing it too (SigV4's signed payload) is
        # a SHA-256 pass over every byte sent: measured, 14% of the CPU of a zstd pack into
        # S3. AWS's SDKs skip it over https as well; AWS_UNSIGNED_PAYLOAD decides if set.
        config["unsigned_payload"] = True
    key, secret = _env("AWS_ACCESS_KEY_ID"), _env("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        config["access_key_id"], config["secret_access_key"] = key, secret
        if token := _env("AWS_SESSION_TOKEN"):
            config["token"] = token
    elif key or secret:
        raise FcsnapError(
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together "
            f"(for store {location.url})"
        )
    elif not _env(*OTHER_CREDENTIALS):
        raise FcsnapError(
            f"no S3 credentials for store {location.url}: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY"
        )
    return config


def _message(e: BaseException) -> str:
    """obstore's errors carry the server's XML and a chain of causes: keep one short line."""
    text = redact(" ".join(str(e).split()))
    code = re.search(r"<Code>([^<]+)</Code>", text)
    if code:
        return code.group(1)
    for marker in ("Server returned non-2xx status code:", "error sending request"):
        if marker in text:
            return text[text.index(marker):][:200]
    return text[:200]


class _S3Writer:
    """A multipart upload fed as the data is produced; only close() makes the object."""

    def __init__(self, objects: S3Objects, key: str) -> None:
        import obstore

        self.objects = objects
        self.key = key
        self.file = obstore.open_writer(
            objects.client, key, buffer_size=PART_SIZE, max_concurrency=PARTS_IN_FLIGHT
        )
        self.done = False
        self.written = 0

    def write(self, data: bytes | memoryview) -> int:
        with self.objects.errors("upload", self.key):
            done = self.file.write(data)
        if self.written < 2 * PART_SIZE <= self.written + done:
            stop_point("uploading")  # parts are up, the upload is not complete (tests)
        self.written += done
        return done

    def close(self) -> None:
        with self.objects.errors("upload", self.key):
            self.file.close()
        self.done = True

    def abort(self) -> None:
        """obstore aborts the multipart upload when the writer is dropped unclosed; an object
        already completed is deleted (it is invisible anyway without its build.json)."""
        self.file = None
        if self.done:
            self.objects.delete(self.key)


class S3Objects:
    def __init__(self, location: S3Location, timeout: float | None = None) -> None:
        """`timeout`: the most seconds one request may take, retries included (restore's
        --fetch-timeout); by default REQUEST_TIMEOUT each and RETRY_TIMEOUT of retries."""
        from obstore.store import S3Store

        self.location = location
        self.url = location.url
        config = _config(location)
        endpoint = config.get("endpoint", "")
        try:
            self.client = S3Store(
                location.bucket,
                prefix=location.prefix or None,
                config=config,
                client_options={
                    "allow_http": endpoint.startswith("http://"),
                    "default_headers": {"Content-Type": CONTENT_TYPE},
                    "connect_timeout": CONNECT_TIMEOUT,
                    "timeout": REQUEST_TIMEOUT if timeout is None else f"{timeout}s",
                },
                retry_config={
                    "max_retries": MAX_RETRIES,
                    "retry_timeout": RETRY_TIMEOUT if timeout is None
                    else datetime.timedelta(seconds=timeout),
                },
            )
        except Exception as e:  # obstore's configuration errors
            raise FcsnapError(f"cannot open store {self.url}: {_message(e)}") from None
        self.endpoint = redact(endpoint) or "AWS S3"  # for messages

    def errors(self, op: str, key: str) -> _Errors:
        return _Errors(self, op, key)

    def get(self, key: str, limit: int | None = None) -> tuple[bytes, str] | None:
        import obstore

        with self.errors("read", key):
            try:
                result = obstore.get(self.client, key)
            except FileNotFoundError as e:
                if "NoSuchBucket" in str(e):
                    raise
                return None
            etag = result.meta["e_tag"] or ""
            if limit is None or result.meta["size"] <= limit:
                return bytes(result.bytes()), etag
            data = bytearray()  # too big: its first bytes, the rest of the body left unread
            for chunk in result.stream(min_chunk_size=limit + 1):
                data += chunk
                if len(data) > limit:
                    break
            return bytes(data[:limit + 1]), etag

    def get_range(self, key: str, start: int, length: int) -> bytes:
        import obstore

        if length == 0:
            return b""
        with self.errors("read", key):
            data = bytes(obstore.get_range(self.client, key, start=start, length=length))
        if len(data) != length:
            raise FcsnapError(f"{self.url}/{key}: short read at {start:#x}")
        return data

    def head(self, key: str) -> ObjectInfo | None:
        import obstore

        with self.errors("read", key):
            try:
                meta = obstore.head(self.client, key)
            except FileNotFoundError as e:
                if "NoSuchBucket" in str(e):
                    raise
                return None
        return _info(meta)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        return list(self.scan(prefix))

    def scan(self, prefix: str = "") -> Iterator[ObjectInfo]:
        import obstore

        with self.errors("list", prefix or "/"):
            for batch in obstore.list(self.client, prefix=prefix or None):
                for meta in batch:
                    yield _info(meta)

    def writer(self, key: str) -> _S3Writer:
        return _S3Writer(self, key)

    def upload(self, key: str, path: Path) -> None:
        import obstore

        with self.errors("upload", key):
            obstore.put(self.client, key, path, chunk_size=PART_SIZE,
                        max_concurrency=PARTS_IN_FLIGHT)

    def put(self, key: str, data: bytes, expect: str | None) -> str:
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        mode: Any = "create" if expect is None else {"e_tag": expect}
        with self.errors("write", key):
            try:
                result = obstore.put(self.client, key, data, mode=mode, use_multipart=False)
            except (AlreadyExistsError, PreconditionError):
                raise Conflict(f"{self.url}/{key} changed") from None
        return result["e_tag"] or ""

    def replace(self, key: str, data: bytes) -> None:
        import obstore

        with self.errors("write", key):
            obstore.put(self.client, key, data, use_multipart=False)

    def delete(self, key: str) -> None:
        import obstore

        with self.errors("delete", key):
            try:
                obstore.delete(self.client, key)
            except FileNotFoundError as e:
                if "NoSuchBucket" in str(e):
                    raise


def _info(meta: Any) -> ObjectInfo:
    return ObjectInfo(
        meta["path"], meta["size"], meta["last_modified"].timestamp(), meta["e_tag"] or ""
    )


class _Errors:
    """obstore's exceptions (and the OSErrors it raises for some) as one FcsnapError line."""

    def __init__(self, objects: S3Objects, op: str, key: str) -> None:
        self.objects, self.op, self.key = objects, op, key

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, e: BaseException | None, tb: Any) -> bool:
        if e is None or isinstance(e, FcsnapError | KeyboardInterrupt | SystemExit):
            return False
        from obstore.exceptions import BaseError, PermissionDeniedError, UnauthenticatedError

        if not isinstance(e, BaseError | OSError | RuntimeError | ValueError):
            return False
        where = f"{self.objects.url}/{self.key}".rstrip("/")
        reason = _message(e)
        if isinstance(e, PermissionDeniedError | UnauthenticatedError) or reason in (
            "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"
        ):
            raise FcsnapError(
                f"S3 refused to {self.op} {where}: {reason} (check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY)"
            ) from None
        if reason == "NoSuchBucket":
            raise FcsnapError(
                f"store {self.objects.url}: bucket {self.objects.location.bucket} does not exist"
            ) from None
        if "error sending request" in reason or "connect" in reason.lower():
            raise FcsnapError(
                f"cannot reach S3 at {self.objects.endpoint} to {self.op} {where}"
            ) from None
        raise FcsnapError(f"S3 failed to {self.op} {where}: {reason}") from None
