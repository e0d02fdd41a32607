"""What each Firecracker release accepts as a `PUT /snapshot/load` body, for the fake API.

Read from Firecracker's source at each release tag from 1.1 to 1.16: the body is deserialized
by serde into `LoadSnapshotConfig` (src/vmm/src/vmm_config/snapshot.rs), which denies unknown
fields, so a field a release does not know is a 400; then the API server's
`parse_put_snapshot_load` wants exactly one of `mem_backend` and `mem_file_path`. Fields by
release: `network_overrides` from 1.12, `track_dirty_pages` from 1.13 (where
`enable_diff_snapshots` is deprecated but still taken), `vsock_override` and `clock_realtime`
from 1.16. `MemBackendConfig` denies unknown fields too; the override objects do not. serde
also takes a struct as a JSON array of its fields in order, and so does the fake.

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


@dataclass(frozen=True)
class Struct:
    name: str
    fields: tuple[Field, ...]
    deny_unknown: bool  # #[serde(deny_unknown_fields)]


@dataclass(frozen=True)
class Field:
    name: str
    shape: str | Struct  # serde's words for what it expects ("a boolean"), or a struct
    since: Version = OLDEST
    default: bool = False  # #[serde(default)]: may be left out
    option: bool = False  # an Option<T>: null (or, in a map, leaving it out) is None
    many: bool = False  # a Vec of `shape`

    def expects(self) -> str:
        if self.many:
            return "a sequence"
        return f"struct {self.shape.name}" if isinstance(self.shape, Struct) else self.shape


VARIANT = "variant"  # MemBackendType: a unit enum, named by a string
MEM_BACKEND = Struct("MemBackendConfig", (
    Field("backend_path", "path string"), Field("backend_type", VARIANT)), deny_unknown=True)
NETWORK_OVERRIDE = Struct("NetworkOverride", (
    Field("iface_id", "a string"), Field("host_dev_name", "a string")), deny_unknown=False)
VSOCK_OVERRIDE = Struct("VsockOverride", (Field("uds_path", "a string"),), deny_unknown=False)
# LoadSnapshotConfig's fields in the struct's order (serde lists them so in its messages).
LOAD_FIELDS = (
    Field("snapshot_path", "path string"),
    Field("mem_file_path", "path string", option=True),
    Field("mem_backend", MEM_BACKEND, option=True),
    Field("enable_diff_snapshots", "a boolean", default=True),
    Field("track_dirty_pages", "a boolean", since=(1, 13), default=True),
    Field("resume_vm", "a boolean", default=True),
    Field("network_overrides", NETWORK_OVERRIDE, since=(1, 12), default=True, many=True),
    Field("vsock_override", VSOCK_OVERRIDE, since=(1, 16), option=True),
    Field("clock_realtime", "a boolean", since=(1, 16), default=True),
)
BACKEND_TYPES = ("File", "Uffd")


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


def load_struct(version: Version) -> Struct:
    """LoadSnapshotConfig as Firecracker `version` has it."""
    fields = tuple(f for f in LOAD_FIELDS if f.since <= version)
    return Struct("LoadSnapshotConfig", fields, deny_unknown=True)


def load_error(raw: bytes, version: Version) -> str | None:
    """Firecracker `version`'s fault message for this body, None if it takes it (the load
    may still fail, as it would for any body: a missing snapshot file, say)."""
    try:
        body = json.loads(raw, object_pairs_hook=Pairs, parse_constant=_not_json)
    except ValueError as e:  # Python's words, not serde's: only the verdict is the same
        return f"{PREFIX}{e}."
    try:
        fields = _struct(body, load_struct(version))
    except Refused as e:
        return f"{PREFIX}{e}."
    memories = [fields.get(name) is not None for name in ("mem_backend", "mem_file_path")]
    if all(memories):
        return f"{PREFIX}{TOO_MANY_MEMORIES}."
    if not any(memories):
        return f"{PREFIX}{MISSING_MEMORY}."
    return None


def _not_json(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _struct(obj: Any, struct: Struct) -> dict[str, Any]:
    """`obj` deserialized as `struct`, in serde's order. From a map: each key as it comes
    (unknown, duplicate, wrong type), then the first field missing that has no default and is
    no Option. From a sequence (serde takes one too): the fields in order, those with a
    default may be left off the end."""
    if isinstance(obj, Pairs):
        return _from_map(obj, struct)
    if isinstance(obj, list):
        return _from_seq(obj, struct)
    raise Refused(f"invalid type: {_kind(obj)}, expected struct {struct.name}")


def _from_map(obj: Pairs, struct: Struct) -> dict[str, Any]:
    by_name = {f.name: f for f in struct.fields}
    seen: dict[str, Any] = {}
    for key, value in obj:
        field = by_name.get(key)
        if field is None:
            if struct.deny_unknown:
                raise Refused(f"unknown field `{key}`, {_expected(struct.fields)}")
            continue
        if key in seen:
            raise Refused(f"duplicate field `{key}`")
        seen[key] = _value(field, value)
    for field in struct.fields:
        if field.name not in seen and not (field.default or field.option):
            raise Refused(f"missing field `{field.name}`")
    return seen


def _from_seq(obj: list[Any], struct: Struct) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for i, field in enumerate(struct.fields):
        if i < len(obj):
            seen[field.name] = _value(field, obj[i])
        elif not field.default:
            raise Refused(f"invalid length {len(obj)}, expected struct {struct.name} with "
                          f"{len(struct.fields)} elements")
    if len(obj) > len(struct.fields):
        raise Refused("trailing characters")
    return seen


def _value(field: Field, value: Any) -> Any:
    if value is None and field.option:
        return None
    if field.many:
        if not isinstance(value, list) or isinstance(value, Pairs):
            raise Refused(f"invalid type: {_kind(value)}, expected a sequence")
        return [_one(field, item) for item in value]
    return _one(field, value)


def _one(field: Field, value: Any) -> Any:
    if isinstance(field.shape, Struct):
        return _struct(value, field.shape)
    if field.shape == VARIANT:
        if not isinstance(value, str):
            raise Refused("expected value")  # serde_json's words for a non-string variant
        if value not in BACKEND_TYPES:
            raise Refused(f"unknown variant `{value}`, expected `File` or `Uffd`")
        return value
    if isinstance(value, bool if field.shape == "a boolean" else str):
        return value
    raise Refused(f"invalid type: {_kind(value)}, expected {field.expects()}")


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
