"""fcguest: the small guest the real-Firecracker tests boot (guest.c says what it does).

`build()` compiles guest.c with the machine's gcc and ld into the test cache
(fcsnap.testing.fcbinary.cache_root()/fcguest-HASH.elf, HASH of the sources and flags), once;
`GuestConfig` is its parameters, passed on the kernel command line so that one build serves
every test; `parse_round` reads its progress lines off Firecracker's stdout (its COM1).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fcsnap.testing.fcbinary import Unavailable, cache_lock

SOURCE_DIR = Path(__file__).resolve().parent
SOURCES = (SOURCE_DIR / "guest.c", SOURCE_DIR / "guest.ld")
CFLAGS = (
    "-O2", "-ffreestanding", "-fno-builtin", "-fno-tree-loop-distribute-patterns",
    "-fno-stack-protector", "-fno-pic", "-fno-pie", "-mno-red-zone", "-mgeneral-regs-only",
    "-fno-asynchronous-unwind-tables", "-Wall", "-Wextra", "-Werror",
)
LDFLAGS = ("-static", "-nostdlib", "-z", "max-page-size=4096")
BUILD_TIMEOUT = 120.0
PAGE = 4096
FILL_BASE = 32 << 20  # the guest fills pages from here up (guest.c)
ROUND = re.compile(r"fcguest round (\d+) (ok|BAD.*)")


@dataclass(frozen=True)
class GuestConfig:
    """What the guest does, in 4 KiB pages: `fill` pages filled at boot (scattered above
    32 MiB, so at most memory - 32 MiB); each round, the first word of `ws` of them read and
    checked (the same pages every round: its working set, every page faulted in on the first
    round after a restore), `sweep` compared word for word in turn (every filled page once
    every fill/sweep rounds), `write` rewritten. `seed` picks the content.

    Under kvm_pvm's emulator a round costs about 0.5 ms per swept page and a few µs per
    working-set page (plus the faults a restore serves); the fill about 0.6 ms a page."""

    fill: int = 2048
    ws: int = 1024
    sweep: int = 512
    write: int = 16
    seed: int = 1

    def cmdline(self) -> str:
        """The kernel command line that passes these to the guest."""
        return (f"fill={self.fill} ws={self.ws} sweep={self.sweep} write={self.write} "
                f"seed={self.seed}")

    def fits(self, mem_mib: int) -> bool:
        """Whether a VM of mem_mib MiB holds the filled pages."""
        return (self.fill * PAGE <= (mem_mib << 20) - FILL_BASE
                and max(self.ws, self.sweep, self.write) <= self.fill)


@dataclass(frozen=True)
class Round:
    """One progress line: the round's number (a counter in guest RAM) and whether every page
    it checked held what it should."""

    number: int
    ok: bool
    line: str


def parse_round(line: str) -> Round | None:
    """A whole progress line as a Round; None for anything else (Firecracker's own output, or
    the tail of a line the guest began before a snapshot)."""
    match = ROUND.fullmatch(line.strip())
    if match is None:
        return None
    return Round(int(match[1]), match[2] == "ok", line.strip())


def build() -> Path:
    """The guest ELF, built into the cache unless it is there. Unavailable without gcc/ld."""
    digest = hashlib.sha256(
        b"\0".join([*(p.read_bytes() for p in SOURCES), " ".join(CFLAGS + LDFLAGS).encode()])
    ).hexdigest()[:16]
    with cache_lock("fcguest") as root:
        elf = root / f"fcguest-{digest}.elf"
        if _is_own_file(elf):
            return elf
        for tool in ("gcc", "ld"):
            if shutil.which(tool) is None:
                raise Unavailable(f"cannot build the test guest: no `{tool}` on PATH")
        with tempfile.TemporaryDirectory(dir=root, prefix=".fcguest-") as tmp:
            obj, out = Path(tmp) / "guest.o", Path(tmp) / "guest.elf"
            for argv in (
                ["gcc", *CFLAGS, "-c", str(SOURCES[0]), "-o", str(obj)],
                ["ld", *LDFLAGS, "-T", str(SOURCES[1]), str(obj), "-o", str(out)],
            ):
                done = subprocess.run(argv, capture_output=True, text=True,
                                      timeout=BUILD_TIMEOUT, stdin=subprocess.DEVNULL)
                if done.returncode != 0:
                    why = (done.stderr.strip().splitlines() or ["no output"])[0]
                    raise Unavailable(f"cannot build the test guest: {argv[0]}: {why}")
            out.replace(elf)
        return elf


def _is_own_file(path: Path) -> bool:
    try:
        st = path.lstat()
    except OSError:
        return False
    return not path.is_symlink() and path.is_file() and st.st_uid == os.getuid()
