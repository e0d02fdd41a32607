"""The daemon's store in object storage: each request's build resolved in the bucket, its
headers and sidecars mirrored, its diffs served through the one host chunk cache the daemon
shares with every other restore on the host (fcsnap/store/backends/chunk_cache.py)."""

from __future__ import annotations

import threading
from pathlib import Path

from fcsnap.store.backends.chunk_cache import ChunkCache
from fcsnap.store.backends.leases import lease_expiry
from fcsnap.store.backends.remote import RemoteStore
from fcsnap.store.backends.stores import mirror_for_serving, read_through


class RemoteBuilds:
    """Resolves a request's VM name or build id to a served build directory (in the mirror);
    its diffs are read on demand through `cache`, each fetch allowed `fetch_timeout`."""

    def __init__(self, store: RemoteStore, cache: ChunkCache, fetch_timeout: float) -> None:
        self.store = store
        self.cache = cache
        self.fetch_timeout = fetch_timeout
        lease_expiry()  # a bad FCSNAP_S3_LEASE_EXPIRY stops the daemon, not each request
        self._lock = threading.Lock()  # one mirror: one request at a time writes it

    def resolve(self, vm: str, verify: bool = False) -> Path:
        """The build (a name read now: it may have moved since the last request). An E2B/Wrenn
        build in the bucket is served as it is (UsageError for `verify`, which cannot apply)."""
        from fcsnap.store.operations.e2b_remote import serve_e2b_in_bucket

        with self._lock:
            foreign = serve_e2b_in_bucket(vm, self.store, self.cache, self.fetch_timeout, verify)
            if foreign is not None:
                return foreign[0]
            head = mirror_for_serving(self.store, vm)
            read_through(self.store, head, self.cache, self.fetch_timeout, serving=True)
        return head

    def __str__(self) -> str:
        return f"{self.store.url} (chunk cache {self.cache.directory})"
