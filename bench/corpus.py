"""A real guest memory corpus: a lineage of memory images of a Linux guest doing work in stages.

Synthetic images (fcsnap.testing.memimage) are shaped by our own guesses; these are not. A
Debian cloud kernel (linux-image-cloud-amd64, the vmlinuz from /boot) and a busybox initramfs
built here boot under QEMU with TCG, guest RAM backed by a shared file. The guest's init runs a
scripted workload in stages (boot; files written to tmpfs; compute and allocations; memory
freed and caches dropped; repeat), printing a marker on the serial console after each and then
waiting for a line from the host. Meanwhile the host pauses the guest over QMP (`stop`),
copies the RAM file - laid out as a Firecracker memory file: raw guest RAM from offset 0, no
header; below 3 GiB QEMU's RAM is one piece - and lets it go on (`cont`, then the line).

Output, in a cache directory (default ~/.cache/fcsnap/corpus/<size>-<stages>-<key>/, the key
hashing everything that shapes the images, so a second run is instant):
gen0.mem, gen1.mem, ... (zero pages left as holes), console.log, and manifest.json with the corpus's
figures per generation: share of zero pages, duplicate pages, pages changed since the previous
generation, zstd ratio of the non-zero pages.

    python bench/corpus.py [--size 256M] [--stages 4] [--cache DIR] [--force] [--json]

Missing tools are installed with apt-get (qemu-system-x86, busybox-static, cpio,
linux-image-cloud-amd64). Where cheap, the guest is deterministic (nokaslr, no page allocator
shuffling, fixed seeds in the workload); TCG timing still varies from run to run.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import queue
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from fcsnap.errors import FcsnapError
from fcsnap.store.format.hashes import DIGEST_SIZE, digest
from fcsnap.units import format_bytes, parse_size

FORMAT = 1  # bump when the workload or the image layout changes: it is part of the cache key
PAGE = 4096
MIB = 1 << 20
DEFAULT_SIZE = 256 * MIB
DEFAULT_STAGES = 4
DEFAULT_CACHE = Path.home() / ".cache" / "fcsnap" / "corpus"
QEMU = "qemu-system-x86_64"
BUSYBOX = Path("/bin/busybox")
PT_INTERP = 3
LOWMEM_LIMIT = 3 << 30  # QEMU splits RAM above this (the PCI hole): the file would not be flat
CMDLINE = "console=ttyS0 quiet nokaslr page_alloc.shuffle=0 panic=-1"
ZSTD_LEVEL = 3  # fcsnap's default level, so the ratio says what `--compress zstd` can get
FIGURES_CHUNK = 64 * MIB
MARKER = re.compile(r"fcsnap-corpus: stage (\d+) (\w+) (done|FAILED)")
TAIL_LINES = 30
ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|c)")  # SeaBIOS clears the screen

# Stage 0 boots; then files, compute and free take turns, each run with its stage number as
# the seed. Each ends with a marker the host waits for, then reads a line before going on.
WORKLOADS = ("files", "compute", "free")
INIT = r"""#!/bin/sh
# fcsnap corpus guest: runs the stages below, announces each on the console, and waits for
# the host (which copies guest memory meanwhile) to send a line before the next one.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /work
mount -t tmpfs -o size=60% work /work
mem_kb=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)
unit=$((mem_kb / 32 / 4 * 4096))  # bytes: a whole number of pages, ~1/32 of memory

stage_boot() { :; }

stage_files() {  # text, its gzip (incompressible), page-aligned duplicates, a binary, zeros
    awk -v seed="$1" 'BEGIN {
        srand(seed)
        for (i = 0; i < 4000000; i++)
            printf "%08d %s %.6f\n", i, substr("alpha beta gamma delta", 1 + int(rand() * 16)),
                rand() * 1000
    }' | head -c "$unit" > /work/text.$1
    gzip -c /work/text.$1 > /work/text.$1.gz
    cat /work/text.$1 /work/text.$1 > /work/twice.$1
    cp /bin/busybox /work/busybox.$1
    dd if=/dev/zero of=/work/zeros.$1 bs=4096 count=$((unit / 8192)) 2>/dev/null
}

stage_compute() {  # allocations in awk's heap and sort's buffers, all freed on exit
    awk -v seed="$1" -v n=$((unit / 256)) 'BEGIN {
        srand(seed)
        for (i = 0; i < n; i++) a[i] = sprintf("%d:%.9f", i, rand())
        for (k in a) s += length(a[k])
        print "compute", s
    }'
    sort -r /work/text.* 2>/dev/null | md5sum
    md5sum /work/* >/dev/null 2>&1
    true
}

stage_free() {  # give memory back: delete files, drop caches, compact
    rm -rf /work/*
    sync
    echo 3 > /proc/sys/vm/drop_caches
    echo 1 > /proc/sys/vm/compact_memory
}

n=0
for stage in @STAGES@; do
    if stage_$stage "$n"; then status=done; else status=FAILED; fi
    echo "fcsnap-corpus: stage $n $stage $status"
    read -r _
    n=$((n + 1))
done
poweroff -f
"""


class CorpusError(Exception):
    """A failure to report in one clear message (with the serial log tail where it helps)."""


@dataclass(frozen=True)
class Tools:
    qemu: str
    qemu_version: str
    kernel: Path
    busybox: Path
    cpio: str


def stage_plan(stages: int) -> list[str]:
    """The workload of each stage: boot first, then the workloads in turn."""
    return ["boot"] + [WORKLOADS[i % len(WORKLOADS)] for i in range(stages - 1)]


def _is_static(binary: Path) -> bool:
    """A 64-bit ELF without a PT_INTERP program header: it runs alone in an initramfs (the
    plain busybox package installs a dynamically linked /bin/busybox)."""
    try:
        with open(binary, "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:5] != b"\x7fELF\x02":
                return False
            phoff, = struct.unpack_from("<Q", head, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != PT_INTERP
               for i in range(phnum))


def _cloud_kernels() -> list[Path]:
    """The cloud kernels in /boot, newest version last."""
    def version(p: Path) -> list[int]:
        return [int(x) for x in re.findall(r"\d+", p.name)]
    return sorted(Path("/boot").glob("vmlinuz-*-cloud-amd64"), key=version)


def kernel_min_size(kernel: Path) -> int:
    """Guest memory the bzImage needs to decompress itself: its load address plus init_size
    (x86 boot protocol 2.10+); a smaller guest dies before printing anything."""
    with open(kernel, "rb") as f:
        head = f.read(0x268)
    if len(head) < 0x268 or head[0x202:0x206] != b"HdrS":
        raise CorpusError(f"{kernel} is not an x86 bzImage")
    pref_address, init_size = struct.unpack_from("<QI", head, 0x258)
    return pref_address + init_size


def ensure_tools() -> Tools:
    """Find QEMU, the kernel, busybox and cpio; apt-get install whatever is missing (only then,
    so that a machine that has them needs neither root nor the network)."""
    missing = []
    if shutil.which(QEMU) is None:
        missing.append("qemu-system-x86")
    if not _cloud_kernels():
        missing.append("linux-image-cloud-amd64")
    if not _is_static(BUSYBOX):
        missing.append("busybox-static")
    if shutil.which("cpio") is None:
        missing.append("cpio")
    if missing:
        apt_install(missing)
    qemu, cpio, kernels = shutil.which(QEMU), shutil.which("cpio"), _cloud_kernels()
    if qemu is None:
        raise CorpusError(f"{QEMU} not found, even after installing qemu-system-x86")
    if not kernels:
        raise CorpusError("no /boot/vmlinuz-*-cloud-amd64, even after installing the kernel")
    if cpio is None or not _is_static(BUSYBOX):
        raise CorpusError("cpio or a static /bin/busybox is missing after installing them")
    version = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout
    return Tools(qemu, version.splitlines()[0] if version else "unknown", kernels[-1], BUSYBOX,
                 cpio)


def apt_install(packages: list[str]) -> None:
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise CorpusError(
            f"missing {', '.join(packages)}: install them (apt-get install "
            f"{' '.join(packages)}) or run as root on Debian to have them installed"
        )
    print(f"corpus: installing {' '.join(packages)} with apt-get", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]):
        result = subprocess.run(argv, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-TAIL_LINES:])
            raise CorpusError(f"{' '.join(argv)} failed (exit {result.returncode}):\n{tail}")


def init_script(stages: int) -> str:
    return INIT.replace("@STAGES@", " ".join(stage_plan(stages)))


def cache_key(tools: Tools, size: int, stages: int) -> str:
    """Everything that shapes the images: the workload, kernel, busybox, QEMU, the command."""
    h = hashlib.sha256()
    for part in (str(FORMAT), init_script(stages), CMDLINE, tools.qemu_version, str(size)):
        h.update(part.encode() + b"\0")
    for path in (tools.kernel, tools.busybox):
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def build_initramfs(tools: Tools, stages: int, dest: Path) -> Path:
    """A newc cpio of busybox and the init script; fixed timestamps, so it is reproducible."""
    root = dest / "initramfs"
    for sub in ("bin", "dev", "proc", "sys", "work"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy(tools.busybox, root / "bin" / "busybox")
    (root / "bin" / "sh").symlink_to("busybox")
    (root / "init").write_text(init_script(stages))
    (root / "init").chmod(0o755)
    entries = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    for name in entries:
        os.utime(root / name, (0, 0), follow_symlinks=False)
    image = dest / "initramfs.cpio"
    with open(image, "wb") as out:
        subprocess.run(
            [tools.cpio, "--quiet", "-o", "-H", "newc", "--reproducible", "-R", "0:0"],
            input="\n".join(entries) + "\n", text=True, cwd=root, stdout=out, check=True,
        )
    shutil.rmtree(root)
    return image


class Qmp:
    """A minimal QMP client: one command at a time; asynchronous events are skipped."""

    def __init__(self, path: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise CorpusError(f"QEMU's QMP socket {path} did not appear") from None
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.stream = self.sock.makefile("rwb")
        self._read()  # the greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.stream.readline()
        if not line:
            raise CorpusError("QEMU closed its QMP socket")
        return json.loads(line)

    def execute(self, command: str) -> Any:
        self.stream.write(json.dumps({"execute": command}).encode() + b"\n")
        self.stream.flush()
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise CorpusError(f"QMP {command}: {reply['error'].get('desc', reply)}")

    def close(self) -> None:
        self.stream.close()
        self.sock.close()


class Console:
    """The guest's serial console (QEMU's stdout): every line goes to a log file and a queue
    that `wait_marker` reads; the guest reads lines we send to QEMU's stdin."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log, "w") as log:
            for raw in self.proc.stdout:
                line = ANSI.sub("", raw.decode(errors="replace")).rstrip("\r\n")
                log.write(line + "\n")
                log.flush()
                self.lines.put(line)
        self.lines.put(None)

    def tail(self) -> str:
        self.thread.join(1)
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        lines = text.splitlines()
        tail = lines[-TAIL_LINES:]
        # A panic's reason comes before its stack trace, which can push it out of the tail.
        panic = [line for line in lines[:-TAIL_LINES] if "Kernel panic" in line][:1]
        if panic:
            tail = [*panic, "...", *tail]
        return "\n".join(tail) if tail else "(the serial console printed nothing)"

    def wait_marker(self, stage: int, name: str, timeout: float) -> None:
        """Wait for stage `stage`'s marker; CorpusError with the log tail on failure, exit
        or timeout."""
        what = "kernel boot timed out" if stage == 0 else "guest workload timed out"
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise CorpusError(
                    f"{what}: no marker for stage {stage} ({name}) after {timeout:g}s; "
                    f"serial console tail:\n{self.tail()}"
                ) from None
            if line is None:
                raise CorpusError(
                    f"QEMU exited (status {self.proc.wait()}) before stage {stage} ({name}) "
                    f"finished; serial console tail:\n{self.tail()}"
                )
            found = MARKER.search(line)
            if found and int(found[1]) == stage:
                if found[3] != "done":
                    raise CorpusError(
                        f"stage {stage} ({name}) failed in the guest; serial console "
                        f"tail:\n{self.tail()}"
                    )
                return

    def send_line(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"\n")
        self.proc.stdin.flush()


def copy_sparse(src: Path, dst: Path, chunk: int = 16 * MIB) -> None:
    """Copy a RAM file, leaving zero pages as holes (most of a young guest is zeros)."""
    with open(src, "rb", buffering=0) as fin, open(dst, "wb", buffering=0) as fout:
        size = os.fstat(fin.fileno()).st_size
        for offset in range(0, size, chunk):
            data = fin.read(chunk)
            if len(data) != min(chunk, size - offset) or len(data) % PAGE:
                raise CorpusError(f"{src}: short read at {offset} of its {size} bytes")
            nonzero = np.frombuffer(data, np.uint64).reshape(-1, PAGE // 8).any(axis=1)
            edges = np.flatnonzero(np.diff(np.concatenate(([0], nonzero.view(np.int8), [0]))))
            for lo, hi in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
                os.pwrite(fout.fileno(), data[lo * PAGE : hi * PAGE], offset + lo * PAGE)
        fout.truncate(size)


def qemu_command(tools: Tools, size: int, ram: Path, initrd: Path, qmp: Path) -> list[str]:
    mib = size // MIB
    return [
        tools.qemu, "-accel", "tcg", "-m", f"{mib}M",
        "-object", f"memory-backend-file,id=mem,size={mib}M,mem-path={ram},share=on",
        "-machine", "memory-backend=mem", "-smp", "1",
        "-nographic", "-nodefaults", "-serial", "stdio", "-no-reboot",
        "-qmp", f"unix:{qmp},server=on,wait=off",
        "-kernel", str(tools.kernel), "-initrd", str(initrd), "-append", CMDLINE,
    ]


def run_guest(
    tools: Tools, size: int, stages: int, work: Path, boot_timeout: float,
    stage_timeout: float,
) -> list[float]:
    """Boot the guest in `work` and write gen<N>.mem after each stage; returns each stage's
    seconds (stage 0: the boot)."""
    initrd = build_initramfs(tools, stages, work)
    ram, qmp_path = work / "guest.ram", work / "qmp.sock"
    argv = qemu_command(tools, size, ram, initrd, qmp_path)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    console = Console(proc, work / "console.log")
    qmp = None
    seconds = []
    try:
        try:
            qmp = Qmp(qmp_path, timeout=30)
        except (CorpusError, OSError) as e:
            raise CorpusError(f"QEMU did not start ({e}); its output:\n{console.tail()}") from e
        for n, name in enumerate(stage_plan(stages)):
            started = time.monotonic()
            console.wait_marker(n, name, boot_timeout if n == 0 else stage_timeout)
            seconds.append(round(time.monotonic() - started, 3))
            qmp.execute("stop")
            copy_sparse(ram, work / f"gen{n}.mem")
            if n + 1 < stages:
                qmp.execute("cont")
                console.send_line()
        qmp.execute("quit")
        proc.wait(timeout=30)
    finally:
        if qmp is not None:
            qmp.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ram.unlink(missing_ok=True)
        initrd.unlink(missing_ok=True)
        qmp_path.unlink(missing_ok=True)
    return seconds


def image_figures(path: Path, previous: np.ndarray | None) -> tuple[dict[str, Any], np.ndarray]:
    """One image's figures and its (pages, 16) page digests (for the next generation's
    "changed"), read in chunks so that memory stays flat whatever the guest size."""
    zero_digest = digest(bytes(PAGE))
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1).compressobj()
    digests: list[bytes] = []
    data_pages = compressed = 0
    with open(path, "rb") as f:
        while chunk := f.read(FIGURES_CHUNK):
            pages = np.frombuffer(chunk, np.uint8).reshape(-1, PAGE)
            nonzero = pages.view(np.uint64).any(axis=1)
            digests += [digest(page) if nz else zero_digest
                        for page, nz in zip(pages, nonzero.tolist(), strict=True)]
            data_pages += int(nonzero.sum())
            compressed += len(compressor.compress(pages[nonzero].tobytes()))
    compressed += len(compressor.flush())
    table = np.frombuffer(b"".join(digests), np.uint8).reshape(-1, DIGEST_SIZE)
    n = len(table)
    unique = len(set(digests) - {zero_digest})
    changed = None if previous is None else int((table != previous).any(axis=1).sum())
    return {
        "file": path.name,
        "pages": n,
        "zero_pages": n - data_pages,
        "zero_share": round((n - data_pages) / n, 6),
        "duplicate_pages": data_pages - unique,
        "duplicate_share": round((data_pages - unique) / n, 6),
        "changed_pages": changed,
        "changed_share": None if changed is None else round(changed / n, 6),
        "zstd_ratio_nonzero": round(data_pages * PAGE / compressed, 3) if data_pages else None,
    }, table


def figures(images: list[Path]) -> list[dict[str, Any]]:
    """Per generation: zero pages, duplicate pages (non-zero pages whose content appeared
    earlier in the same image: what dedup saves), pages changed since the previous generation
    (what a diff stores at most), and the zstd ratio of the non-zero pages (one stream at
    fcsnap's default level)."""
    out = []
    previous = None
    for path in images:
        row, previous = image_figures(path, previous)
        out.append(row)
    return out


@dataclass(frozen=True)
class Corpus:
    path: Path
    manifest: dict[str, Any]

    @property
    def images(self) -> list[Path]:
        return [self.path / g["file"] for g in self.manifest["generations"]]


def _complete(path: Path, size: int) -> dict[str, Any] | None:
    """The manifest of a finished corpus at `path`, or None."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        ok = all((path / g["file"]).stat().st_size == size for g in manifest["generations"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest if ok else None


def cached_corpus(
    size: int = DEFAULT_SIZE, stages: int = DEFAULT_STAGES, cache: Path = DEFAULT_CACHE
) -> Corpus | None:
    """The newest finished corpus of (size, stages) in `cache`, found without booting or
    installing anything; None when there is none (a bench then falls back to synthetic
    memory). Unlike build_corpus it does not check that the cache key matches today's tools."""
    found = []
    for path in cache.glob(f"{size // MIB}M-{stages}-*"):
        manifest = _complete(path, size)
        if manifest is not None and manifest.get("format") == FORMAT:
            found.append((manifest.get("created_at", ""), str(path), manifest))
    if not found:
        return None
    _, path, manifest = max(found, key=lambda f: f[:2])
    return Corpus(Path(path), manifest)


def build_corpus(
    size: int = DEFAULT_SIZE, stages: int = DEFAULT_STAGES, cache: Path = DEFAULT_CACHE,
    force: bool = False, boot_timeout: float = 300.0, stage_timeout: float = 600.0,
) -> Corpus:
    """The corpus for (size, stages), from the cache if it is there, else built and cached."""
    if size % MIB or not 16 * MIB <= size <= LOWMEM_LIMIT:
        raise CorpusError(
            f"guest size {size} must be whole MiB from 16 MiB to 3 GiB (above, QEMU splits "
            "RAM around the PCI hole and the file is no longer a flat memory file)"
        )
    if stages < 1:
        raise CorpusError("at least one stage (the boot)")
    tools = ensure_tools()
    if size < (needed := kernel_min_size(tools.kernel)):
        raise CorpusError(
            f"guest size {size // MIB} MiB is too small for {tools.kernel}: it decompresses "
            f"itself into the first {needed / MIB:.1f} MiB (and the guest needs more to run)"
        )
    key = cache_key(tools, size, stages)
    final = cache / f"{size // MIB}M-{stages}-{key}"
    if not force and (manifest := _complete(final, size)) is not None:
        return Corpus(final, manifest)
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=cache))
    try:
        seconds = run_guest(tools, size, stages, work, boot_timeout, stage_timeout)
        images = [work / f"gen{n}.mem" for n in range(stages)]
        manifest = {
            "format": FORMAT,
            "key": key,
            "size": size,
            "page_size": PAGE,
            "stages": stage_plan(stages),
            "stage_seconds": seconds,
            "kernel": str(tools.kernel),
            "cmdline": CMDLINE,
            "qemu": tools.qemu_version,
            "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "generations": figures(images),
        }
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        work.rename(final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return Corpus(final, manifest)


def summary_lines(corpus: Corpus) -> Iterator[str]:
    m = corpus.manifest
    yield f"corpus {corpus.path} ({format_bytes(m['size'])}, stages {' '.join(m['stages'])})"
    yield f"  {'file':<10} {'stage':<8} {'zero':>7} {'dup':>7} {'changed':>8} {'zstd':>6}"
    for stage, g in zip(m["stages"], m["generations"], strict=True):
        changed = "-" if g["changed_share"] is None else f"{g['changed_share']:.1%}"
        ratio = "-" if g["zstd_ratio_nonzero"] is None else f"{g['zstd_ratio_nonzero']:.2f}"
        yield (f"  {g['file']:<10} {stage:<8} {g['zero_share']:>7.1%} "
               f"{g['duplicate_share']:>7.1%} {changed:>8} {ratio:>6}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="256M", help="guest memory (default 256M)")
    p.add_argument("--stages", type=int, default=DEFAULT_STAGES,
                   help=f"stages, so generations (default {DEFAULT_STAGES})")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache directory")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.add_argument("--boot-timeout", type=float, default=300.0, help="seconds")
    p.add_argument("--stage-timeout", type=float, default=600.0, help="seconds")
    p.add_argument("--json", action="store_true", help="print {path, manifest} as JSON")
    a = p.parse_args(argv)
    try:
        corpus = build_corpus(parse_size(a.size, "guest size"), a.stages, a.cache, a.force,
                              a.boot_timeout, a.stage_timeout)
    except (CorpusError, FcsnapError) as e:
        print(f"corpus: error: {e}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps({"path": str(corpus.path), "manifest": corpus.manifest}, indent=2))
    else:
        print("\n".join(summary_lines(corpus)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
