"""Leases: what stands for flock in a store in object storage (docs/FORMAT.md §8.6).

A process serving builds from S3 (restore, the daemon) cannot lock them: gc runs on another
host. It writes a lease instead, an object `leases/serve/<id>` naming every build it reads,
and rewrites it every expiry/REFRESHES while it runs; gc keeps every build a live lease names. A
lease is live while its object is younger (by its LastModified) than the expiry its body
states: a holder that died (SIGKILL, a lost host) stops refreshing, and its lease is ignored
once that long has passed; gc reports such leases as stale and deletes them.

gc writes a lease too (kind "gc", naming the builds it is about to delete) before it reads the
others: whoever writes second sees the first. A holder that finds a gc lease naming its builds
waits for that gc to end and then checks its builds are still committed, so either gc saw the
holder's lease and kept its builds, or the holder sees they are gone and fails cleanly before
serving anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from fcsnap.errors import FcsnapError, UsageError
from fcsnap.store.backends.remote import RemoteStore
from fcsnap.store.format.layout import LEASES
from fcsnap.units import parse_duration

FORMAT = 1
EXPIRY_ENV = "FCSNAP_S3_LEASE_EXPIRY"
DEFAULT_EXPIRY = 600.0  # seconds without a refresh after which a lease is stale
REFRESHES = 10  # refreshes per expiry: a holder may miss nine in a row (S3 unreachable)
GC_WAIT = 120.0  # seconds a new holder waits for a gc deleting its builds to end
POLL = 0.2
LEASE_MAX = 1 << 20  # bytes: a bigger object under leases/ is not a lease
MARGIN = 1.0  # seconds added to an expiry: S3 gives LastModified to the whole second


def lease_expiry() -> float:
    """The expiry this process writes into its leases: FCSNAP_S3_LEASE_EXPIRY (a duration
    with its unit: 30s, 10m) or DEFAULT_EXPIRY."""
    text = os.environ.get(EXPIRY_ENV)
    if text is None:
        return DEFAULT_EXPIRY
    try:
        expiry = parse_duration(text, EXPIRY_ENV) if text.strip()[-1:].isalpha() else 0.0
    except UsageError:
        expiry = 0.0
    if expiry < 1:  # like AWS_ENDPOINT_URL, not an argument: exit 1, no pointer to --help
        raise FcsnapError(f"invalid {EXPIRY_ENV} {text!r}: a duration of at least 1s, with "
                         "its unit (30s, 10m)")
    return expiry


def _holder() -> str:
    return f"{socket.gethostname()} pid {os.getpid()}"


class RemoteLease:
    """One lease object, refreshed by the process's keeper until released."""

    def __init__(self, store: RemoteStore, builds: Iterable[uuid.UUID], kind: str,
                 expiry: float) -> None:
        self.store = store
        self.builds = sorted(set(builds))
        self.kind = kind
        self.expiry = expiry
        self.key = f"{LEASES}/{kind}/{uuid.uuid4().hex}"  # a holder lists only leases/gc/
        self.released = False
        self.failing = False  # the last refresh failed (said once on stderr)
        self._lock = threading.Lock()  # a refresh never writes the object after its delete

    @property
    def url(self) -> str:
        return f"{self.store.url}/{self.key}"

    def body(self) -> bytes:
        return json.dumps({
            "format": FORMAT, "kind": self.kind, "holder": _holder(),
            "builds": [str(b) for b in self.builds], "expires_after_s": self.expiry,
            "refresh_every_s": self.expiry / REFRESHES, "written_at": round(time.time(), 3),
        }).encode()

    def write(self) -> None:
        self.store.objects.replace(self.key, self.body())

    def refresh(self) -> None:
        try:
            with self._lock:
                if self.released:
                    return
                self.write()
        except FcsnapError as e:
            if not self.failing:
                print(f"fcsnap: warning: cannot refresh lease {self.url}: {e}; its builds are "
                      f"unprotected from gc {self.expiry:g}s after the last refresh",
                      file=sys.stderr)
            self.failing = True
            return
        self.failing = False

    def release(self) -> None:
        with self._lock:
            if self.released:
                return
            self.released = True
        _keeper.drop(self)
        with contextlib.suppress(FcsnapError):  # the store is unreachable: it expires
            self.store.objects.delete(self.key)


class _Keeper:
    """One thread per process refreshing every lease it holds, each every expiry/REFRESHES."""

    def __init__(self) -> None:
        self._leases: dict[str, tuple[RemoteLease, float]] = {}  # key -> (lease, next due)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, lease: RemoteLease) -> None:
        with self._lock:
            self._leases[lease.key] = (lease, time.monotonic() + lease.expiry / REFRESHES)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fcsnap-leases",
                                                daemon=True)
                self._thread.start()
        self._wake.set()

    def drop(self, lease: RemoteLease) -> None:
        with self._lock:
            self._leases.pop(lease.key, None)

    def _run(self) -> None:
        while True:
            now = time.monotonic()
            with self._lock:
                due = [lease for lease, at in self._leases.values() if at <= now]
                for lease in due:
                    self._leases[lease.key] = (lease, now + lease.expiry / REFRESHES)
                nearest = min((at for _, at in self._leases.values()), default=now + 60)
            for lease in due:
                lease.refresh()
            self._wake.wait(max(0.0, nearest - time.monotonic()))
            self._wake.clear()


_keeper = _Keeper()


def take(store: RemoteStore, builds: Iterable[uuid.UUID], kind: str = "serve",
         expiry: float | None = None) -> RemoteLease:
    """Write a lease on `builds` and keep it refreshed until released. A "serve" lease then
    waits out any gc lease naming its builds and checks they are still committed; FcsnapError
    (its lease deleted) when one is gone."""
    lease = RemoteLease(store, builds, kind, lease_expiry() if expiry is None else expiry)
    lease.write()
    _keeper.add(lease)
    if kind == "gc":
        return lease
    try:
        _wait_for_gc(store, set(lease.builds))
        for build_id in lease.builds:
            if not store.has_build(build_id):
                raise FcsnapError(f"build {build_id} was deleted from {store.url} by gc "
                                  "while it was being opened")
    except BaseException:
        lease.release()
        raise
    return lease


def _wait_for_gc(store: RemoteStore, builds: set[uuid.UUID]) -> None:
    deadline = time.monotonic() + GC_WAIT
    while True:
        live, _ = read_leases(store, time.time(), "gc/")
        deleting = [e for e in live if e.builds is None or e.builds & builds]
        if not deleting:
            return
        if time.monotonic() > deadline:
            raise FcsnapError(f"a gc of {store.url} ({deleting[0].holder}) is deleting builds "
                              f"this one reads and did not end within {GC_WAIT:g}s")
        time.sleep(POLL)


@dataclass(frozen=True)
class LeaseEntry:
    """A lease object as gc reads it. `builds` None: its body cannot be read (a live one then
    protects every build)."""

    key: str
    kind: str
    holder: str
    builds: set[uuid.UUID] | None
    age: float
    expiry: float

    def as_dict(self, url: str) -> dict[str, object]:
        return {"lease": f"{url}/{self.key}", "kind": self.kind, "holder": self.holder,
                "age_s": round(self.age, 1), "expires_after_s": self.expiry}


def _parse(key: str, data: bytes | None, age: float) -> LeaseEntry:
    try:
        body = json.loads(data or b"")
        builds = {uuid.UUID(b) for b in body["builds"]}
        expiry = float(body["expires_after_s"])
        if not 0 < expiry < float("inf"):
            raise ValueError
        return LeaseEntry(key, str(body["kind"]), str(body.get("holder", "?")), builds, age,
                          expiry)
    except (ValueError, TypeError, KeyError, AttributeError):
        return LeaseEntry(key, "unreadable", "?", None, age, DEFAULT_EXPIRY)


def read_leases(store: RemoteStore, now: float, prefix: str = ""
                ) -> tuple[list[LeaseEntry], list[LeaseEntry]]:
    """Every lease in the store under `leases/<prefix>` (whole path segments: `gc/`): (live,
    stale). A lease's age is `now` less its object's LastModified (the server's clock when it
    was last written); it is stale once its age reaches its expiry and MARGIN."""
    live, stale = [], []
    for info in store.objects.list(f"{LEASES}/{prefix}"):
        if info.size > LEASE_MAX:
            data = None
        else:
            found = store.objects.get(info.key, LEASE_MAX)
            if found is None:
                continue  # released meanwhile
            data = found[0] if len(found[0]) <= LEASE_MAX else None  # replaced since listed
        entry = _parse(info.key, data, now - info.mtime)
        (live if entry.age < entry.expiry + MARGIN else stale).append(entry)
    return live, stale
