"""What each Firecracker release accepts as a `PUT /snapshot/load` body, for the fake API.

Read from Firecracker's source at each release tag from 1.1 to 1.16: the body is deserialized
by serde into `LoadSnapshotConfig` (src/vmm/src/vmm_config/snapshot.rs), which denies unknown
fields, so a field a release does not know is a 400; then the API server's
`parse_put_snapshot_load` wants exactly one of `mem_backend` and `mem_file_path`. Fields by
release: `network_overrides` from 1.12, `track_dirty_pages` from 1.13 (where
`enable_diff_snapshots` is deprecated but still taken), `vsock_override` and `clock_realtime`
from 1.16. `MemBackendConfig` denies unknown fields too; the override objects do not.

`load_error` gives serde's first error as Firecracker words it (without serde's `at line L
column C`), so a test can compare the fake's verdict and message with the real binary's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

Version = tuple[int, int]
OLDEST, NEWEST = (1, 1), (1, 16)  # the releases the fake imitates
PREFIX = "An error occurred when deserializing the json body of a request: "
MISSING_MEMORY = "missing field: either `mem_backend` or `mem_file_path` is required"
TOO_MANY_MEMORIES = (
    "too many fields: either `mem_backend` or `mem_file_path` exclusively is required")
BACKEND_TYPES = ("File", "Uffd")


@dataclass(frozen=True)
class Field:
    name: str
    kind: type  # the JSON value's Python type: str, bool, dict, list
    since: Version = OLDEST
    required: bool = False
    option: bool = False  # an Option<T>: null is taken as absent


# LoadSnapshotConfig's fields in the struct's order (serde lists them so in its messages).
LOAD_FIELDS = (
    Field("snapshot_path", str, required=True),
    Field("mem_file_path", str, option=True),
    Field("mem_backend", dict, option=True),
    Field("enable_diff_snapshots", bool),
    Field("track_dirty_pages", bool, since=(1, 13)),
    Field("resume_vm", bool),
    Field("network_overrides", list, since=(1, 12)),
    Field("vsock_override", dict, since=(1, 16), option=True),
    Field("clock_realtime", bool, since=(1, 16)),
)
BACKEND_FIELDS = (Field("backend_path", str, required=True),
                  Field("backend_type", str, required=True))
NETWORK_FIELDS = (Field("iface_id", str, required=True),
                  Field("host_dev_name", str, required=True))
VSOCK_FIELDS = (Field("uds_path", str, required=True),)
JSON_NAMES = {str: "a string", bool: "a boolean", dict: "a map", list: "a sequence"}


class Pairs(list[tuple[str, Any]]):
    """A JSON object as its (key, value) pairs in order, duplicates kept, as serde sees it."""


class Refused(Exception):
    """serde's (or the API server's) first objection to a body."""


def parse_version(text: str) -> Version:
    """(major, minor) of a version the fake imitates; ValueError for any other."""
    major, minor = (int(part) for part in text.split(".")[:2])
    if not OLDEST <= (major, minor) <= NEWEST:
        raise ValueError(f"the fake imitates Firecracker {OLDEST} to {NEWEST}, not {text}")
    return major, minor


def load_fields(version: Version) -> tuple[Field, ...]:
    return tuple(f for f in LOAD_FIELDS if f.since <= version)


def load_error(raw: bytes, version: Version) -> str | None:
    """Firecracker `version`'s fault message for this body, None if it takes it (the load
    may still fail, as it would for any body: a missing snapshot file, say)."""
    try:
        body = json.loads(raw, object_pairs_hook=Pairs)
    except ValueError as e:
        return f"{PREFIX}{e}."
    try:
        fields = _struct(body, load_fields(version), "LoadSnapshotConfig", deny_unknown=True)
    except Refused as e:
        return f"{PREFIX}{e}."
    memories = [fields.get(name) is not None for name in ("mem_backend", "mem_file_path")]
    if all(memories):
        return f"{PREFIX}{TOO_MANY_MEMORIES}."
    if not any(memories):
        return f"{PREFIX}{MISSING_MEMORY}."
    return None


def _struct(obj: Any, fields: tuple[Field, ...], name: str, deny_unknown: bool
            ) -> dict[str, Any]:
    """`obj` deserialized as the struct `name`, in serde's order: each key as it comes
    (unknown, duplicate, wrong type), then the first required field missing."""
    if not isinstance(obj, Pairs):
        raise Refused(f"invalid type: {_kind(obj)}, expected struct {name}")
    by_name = {f.name: f for f in fields}
    seen: dict[str, Any] = {}
    for key, value in obj:
        field = by_name.get(key)
        if field is None:
            if deny_unknown:
                raise Refused(f"unknown field `{key}`, {_expected(fields)}")
            continue
        if key in seen:
            raise Refused(f"duplicate field `{key}`")
        seen[key] = _value(field, value)
    for field in fields:
        if field.required and field.name not in seen:
            raise Refused(f"missing field `{field.name}`")
    return seen


def _value(field: Field, value: Any) -> Any:
    if value is None and field.option:
        return None
    if field.kind is dict and isinstance(value, Pairs):
        if field.name == "mem_backend":
            backend = _struct(value, BACKEND_FIELDS, "MemBackendConfig", deny_unknown=True)
            if backend["backend_type"] not in BACKEND_TYPES:
                raise Refused(f"unknown variant `{backend['backend_type']}`, expected "
                              "`File` or `Uffd`")
            return backend
        return _struct(value, VSOCK_FIELDS, "VsockOverride", deny_unknown=False)
    if field.kind is list and isinstance(value, list) and not isinstance(value, Pairs):
        return [_struct(item, NETWORK_FIELDS, "NetworkOverride", deny_unknown=False)
                for item in value]
    if field.kind in (str, bool) and isinstance(value, field.kind):
        return value
    raise Refused(f"invalid type: {_kind(value)}, expected {JSON_NAMES[field.kind]}")


def _kind(value: Any) -> str:
    """serde's words for a JSON value it did not expect."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, str):
        return f"string {json.dumps(value)}"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value}`"
    return "map" if isinstance(value, Pairs) else "sequence"


def _expected(fields: tuple[Field, ...]) -> str:
    """serde's list of a struct's field names in an unknown-field message."""
    names = [f"`{f.name}`" for f in fields]
    if len(names) == 1:
        return f"expected {names[0]}"
    if len(names) == 2:
        return f"expected {names[0]} or {names[1]}"
    return f"expected one of {', '.join(names)}"
