"""build.json: the manifest of one build (docs/FORMAT.md §6)."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fcsnap.errors import FcsnapError
from fcsnap.files import read_regular
from fcsnap.store.format.layout import MANIFEST
from fcsnap.units import BLOCK_SIZES

COMPRESSIONS = ("none", "zstd")


def sidecar_pin(sidecar: bytes) -> str:
    """A build's pin in its children's build.json: the SHA-256 of its sidecar's bytes (whose
    digests pin every block). Here, not with the sidecar's parser, so that checking pins
    (`inspect`, `ls NAME`) loads neither numpy nor xxhash."""
    return "sha256:" + hashlib.sha256(sidecar).hexdigest()


@dataclass(frozen=True)
class Stats:
    blocks_total: int = 0
    blocks_stored: int = 0
    blocks_zero: int = 0
    blocks_deduplicated: int = 0
    blocks_inherited: int = 0
    bytes_stored: int = 0  # uncompressed bytes of this build's diff
    bytes_written: int = 0  # bytes of the diff file on disk


@dataclass(frozen=True)
class Manifest:
    build_id: uuid.UUID
    parent_build_id: uuid.UUID | None
    generation: int
    base_build_id: uuid.UUID
    block_size: int
    size: int
    compression: str
    frame_size: int | None
    created_at: str
    fcsnap_version: str
    source: str
    stats: Stats = field(default_factory=Stats)
    compression_level: int | None = None
    # SHA-256 of the hash sidecar of every other build the header reads ("sha256:<hex>");
    # None for a build written before pins existed (unpinned).
    pins: dict[uuid.UUID, str] | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("build_id", "parent_build_id", "base_build_id"):
            out[key] = None if out[key] is None else str(out[key])
        if self.pins is None:
            del out["pins"]
        else:
            out["pins"] = {str(k): v for k, v in sorted(self.pins.items())}
        return out


def _uuid(value: Any, key: str, source: str, optional: bool = False) -> uuid.UUID | None:
    if value is None and optional:
        return None
    try:
        return uuid.UUID(value)
    except (TypeError, ValueError, AttributeError):
        raise FcsnapError(f"{source}: {key} is not a UUID: {value!r:.80}") from None


def _int(value: Any, key: str, source: str, optional: bool = False) -> int | None:
    """Sizes, counts and the generation are u64 in the header; build.json holds no others."""
    if value is None and optional:
        return None
    if type(value) is not int or not 0 <= value < 1 << 64:
        raise FcsnapError(f"{source}: {key} is not an unsigned 64-bit integer: {value!r:.80}")
    return value


def _str(value: Any, key: str, source: str) -> str:
    if not isinstance(value, str):
        raise FcsnapError(f"{source}: {key} is not a string: {value!r:.80}")
    return value


def _compression_level(value: Any, source: str) -> int | None:
    if value is not None and (type(value) is not int or not 1 <= value <= 22):
        raise FcsnapError(f"{source}: compression_level is not a zstd level 1-22: {value!r:.80}")
    return value


PIN = re.compile(r"sha256:[0-9a-f]{64}")


def _pins(value: Any, source: str) -> dict[uuid.UUID, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise FcsnapError(f"{source}: pins is not an object")
    pins = {}
    for key, pin in value.items():
        build_id = _uuid(key, "pins key", source)
        if not isinstance(pin, str) or not PIN.fullmatch(pin):
            raise FcsnapError(f"{source}: pin of {key} is not sha256:<64 hex digits>: {pin!r:.80}")
        pins[build_id] = pin
    return pins


def parse_manifest(data: bytes, source: str = MANIFEST) -> Manifest:
    """Parse and check build.json; every problem is an FcsnapError naming the field."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise FcsnapError(f"{source}: not valid JSON ({e})") from None
    except RecursionError:
        raise FcsnapError(f"{source}: not a manifest (JSON nested too deeply)") from None
    if not isinstance(raw, dict):
        raise FcsnapError(f"{source}: expected a JSON object")
    for key in ("build_id", "generation", "base_build_id", "block_size", "size", "compression"):
        if key not in raw:
            raise FcsnapError(f"{source}: missing {key}")
    block_size = _int(raw["block_size"], "block_size", source)
    if block_size not in BLOCK_SIZES:
        raise FcsnapError(f"{source}: block_size {block_size} is neither 4 KiB nor 2 MiB")
    if raw["compression"] not in COMPRESSIONS:
        raise FcsnapError(f"{source}: unknown compression {raw['compression']!r:.80}")
    size = _int(raw["size"], "size", source)
    if not size or size % block_size:
        raise FcsnapError(f"{source}: size {size} is not a positive multiple of {block_size}")
    stats_raw = raw.get("stats", {})
    if not isinstance(stats_raw, dict):
        raise FcsnapError(f"{source}: stats is not an object")
    stats = Stats(
        **{k: _int(stats_raw.get(k, 0), f"stats.{k}", source) for k in Stats.__dataclass_fields__}
    )
    generation = _int(raw["generation"], "generation", source)
    parent = _uuid(raw.get("parent_build_id"), "parent_build_id", source, optional=True)
    if (parent is None) != (generation == 0):
        raise FcsnapError(f"{source}: generation {generation} with parent {parent}")
    frame_size = _int(raw.get("frame_size"), "frame_size", source, optional=True)
    if raw["compression"] == "zstd" and not frame_size:
        raise FcsnapError(f"{source}: zstd compression without a frame_size")
    return Manifest(
        build_id=_uuid(raw["build_id"], "build_id", source),
        parent_build_id=parent,
        generation=generation,
        base_build_id=_uuid(raw["base_build_id"], "base_build_id", source),
        block_size=block_size,
        size=size,
        compression=raw["compression"],
        frame_size=frame_size,
        created_at=_str(raw.get("created_at", ""), "created_at", source),
        fcsnap_version=_str(raw.get("fcsnap_version", ""), "fcsnap_version", source),
        source=_str(raw.get("source", ""), "source", source),
        stats=stats,
        compression_level=_compression_level(raw.get("compression_level"), source),
        pins=_pins(raw.get("pins"), source),
    )


def read_manifest(build_dir: Path) -> Manifest:
    path = build_dir / MANIFEST
    return parse_manifest(read_regular(path, "manifest"), str(path))


def write_manifest(build_dir: Path, manifest: Manifest) -> None:
    text = json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n"
    (build_dir / MANIFEST).write_text(text)
