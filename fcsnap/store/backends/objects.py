"""The store as objects: the small interface both kinds of store offer (docs/FORMAT.md §8.5).

A store is a set of objects named by keys ("<build-id>/memfile.header", "vms/<name>"): read
whole or by range, written whole or streamed, listed by prefix, replaced only if unchanged
(compare-and-swap on an ETag), deleted. `LocalObjects` is a store directory (a key is a path
under it), `S3Objects` (fcsnap/store/backends/s3.py) a bucket and prefix. Code that copies builds or
moves names through this interface works on either.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fcsnap.errors import FcsnapError
from fcsnap.files import fsync_path


class Conflict(FcsnapError):
    """A conditional put lost: the object is not (or no longer) what the caller expected."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch: when it was written
    etag: str


class ObjectWriter(Protocol):
    def write(self, data: bytes | memoryview) -> int: ...
    def close(self) -> None:
        """Commit: the object appears whole, or not at all."""
    def abort(self) -> None:
        """Give up: nothing appears (a multipart upload is aborted)."""


class ObjectStore(Protocol):
    url: str

    def get(self, key: str, limit: int | None = None) -> tuple[bytes, str] | None:
        """The whole object and its ETag; None when it does not exist. With `limit`, at most
        `limit` + 1 bytes are read: a caller that expects a small object sees that it is too
        big without the rest of it being fetched."""
    def get_range(self, key: str, start: int, length: int) -> bytes: ...
    def head(self, key: str) -> ObjectInfo | None: ...
    def list(self, prefix: str = "") -> list[ObjectInfo]: ...
    def scan(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """The listing as the server pages it: a caller that stops early asks for no
        more pages."""
    def writer(self, key: str) -> ObjectWriter: ...
    def upload(self, key: str, path: Path) -> None:
        """Copy a local file into the object, streamed (multipart when large)."""
    def put(self, key: str, data: bytes, expect: str | None) -> str:
        """Write `data` only if the object's ETag is `expect` (None: only if it does not
        exist); returns the new ETag; Conflict otherwise."""
    def replace(self, key: str, data: bytes) -> None:
        """Write `data` whatever the object holds (for servers without If-Match)."""
    def delete(self, key: str) -> None: ...


def local_etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _LocalWriter:
    """A temporary file beside the object, renamed over it on close."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.tmp = path.parent / f".tmp-{uuid.uuid4().hex}"
        self.file = open(self.tmp, "wb")  # noqa: SIM115 (closed in close/abort)

    def write(self, data: bytes | memoryview) -> int:
        return self.file.write(data)

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.rename(self.tmp, self.path)
        fsync_path(self.path.parent)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


class LocalObjects:
    """A store directory as objects. Conditional puts run under the store's name lock (the
    lock every local command moves names under), with a SHA-256 of the content as ETag."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = str(root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str, limit: int | None = None) -> tuple[bytes, str] | None:
        try:
            with open(self._path(key), "rb") as f:
                data = f.read() if limit is None else f.read(limit + 1)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        return data, local_etag(data)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        with open(self._path(key), "rb") as f:
            data = os.pread(f.fileno(), length, start)
        if len(data) != length:
            raise FcsnapError(f"{self._path(key)}: short read at {start:#x}")
        return data

    def head(self, key: str) -> ObjectInfo | None:
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return ObjectInfo(key, st.st_size, st.st_mtime, "")

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        found = []
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                if name.startswith("."):  # the protocol's own files: locks, temporaries
                    continue
                path = Path(dirpath) / name
                key = str(path.relative_to(self.root))
                if key.startswith(prefix):
                    st = path.stat()
                    found.append(ObjectInfo(key, st.st_size, st.st_mtime, ""))
        return sorted(found, key=lambda o: o.key)

    def scan(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return iter(self.list(prefix))

    def writer(self, key: str) -> _LocalWriter:
        return _LocalWriter(self._path(key))

    def upload(self, key: str, path: Path) -> None:
        writer = self.writer(key)
        try:
            with open(path, "rb") as f:
                while chunk := f.read(8 << 20):
                    writer.write(chunk)
        except BaseException:
            writer.abort()
            raise
        writer.close()

    def put(self, key: str, data: bytes, expect: str | None) -> str:
        from fcsnap.store.format.locks import name_lock

        self.root.mkdir(parents=True, exist_ok=True)
        with name_lock(self.root):
            current = self.get(key)
            if (current[1] if current else None) != expect:
                raise Conflict(f"{self._path(key)} changed")
            writer = self.writer(key)
            writer.write(data)
            writer.close()
        return local_etag(data)

    def replace(self, key: str, data: bytes) -> None:
        writer = self.writer(key)
        writer.write(data)
        writer.close()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
