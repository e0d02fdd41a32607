"""What every benchmark states about where it ran, the page-cache reset it needs, and where
its results go."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path


def machine() -> dict[str, object]:
    """CPU, cores, memory, kernel and Python of this machine."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
        platform.processor(),
    )
    memory_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kib / (1 << 20), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def filesystem(path: Path) -> str:
    """The device and filesystem type holding `path` (timings depend on them)."""
    out = subprocess.run(
        ["df", "--output=source,fstype", str(path)], capture_output=True, text=True
    ).stdout.splitlines()[1]
    return " ".join(out.split())


def drop_caches() -> None:
    """Write back, then drop the page cache (root only): the next read comes from disk."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def publish(stem: Path, result: dict[str, object], text: str) -> None:
    """Write a bench's result as STEM.json and its table as STEM.md, and print the table."""
    stem.parent.mkdir(exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(text)
