"""The bundled real-guest fixture (fixtures/guest): three generations of Linux guest memory.

Kept in the repository as one zstd stream of three equal windows; `read_lineage` splits it back
into memory files. Used by the golden tests, `fixtures/make_guest.py` and `fcsnap demo`.
"""

from __future__ import annotations

import json
from pathlib import Path

import zstandard

from fcsnap.errors import FcsnapError

HERE = Path(__file__).resolve().parent.parent.parent / "fixtures" / "guest"
LINEAGE = HERE / "lineage.mem.zst"
EXPECTED = HERE / "expected.json"
WINDOW = 32 << 20  # bytes of guest RAM kept per generation


def available() -> bool:
    return LINEAGE.is_file() and EXPECTED.is_file()


def read_lineage(dest: Path) -> list[Path]:
    """Decompress the fixture into dest/gen<N>.mem; returns the paths, oldest first."""
    count = json.loads(EXPECTED.read_text())["generations"]
    paths = []
    with open(LINEAGE, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as reader:
        for g in range(count):
            path = dest / f"gen{g}.mem"
            data = reader.read(WINDOW)
            while len(data) < WINDOW and (more := reader.read(WINDOW - len(data))):
                data += more
            if len(data) != WINDOW:
                raise FcsnapError(f"{LINEAGE}: generation {g} is cut short")
            path.write_bytes(data)
            paths.append(path)
    return paths
