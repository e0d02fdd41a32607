"""A longer fuzz run over every parser of untrusted bytes: for each input a correct result or an
FcsnapError with a message, never another exception, never memory in proportion to a claim.

Targets: header (memfile.header, every version), e2bbody (E2B's V4/V5 header body, LZ4-framed
by the target so that mutations reach the builds section, frame tables and varint columns),
hashes (memfile.hashes), seektable (zstd seekable seek table),
seekable (a whole seekable file: table and every frame decompressed), manifest (build.json),
regions (the JSON region list of Firecracker's UFFD handshake), handshake (that handshake as
received from a socket: payload in chunks, no fd, the uffd, other or too many fds, the sender
hanging up, going quiet or a stop request; every fd that arrives must be handed over or closed),
workingset (--prefetch-ws files). Each target runs in its own process for --seconds, with atheris
(coverage-guided libFuzzer) when it is installed and hypothesis otherwise, starting from valid
inputs of that format, its address space capped a little above what it uses once loaded.
Prints the executions and findings per target; exits 1 when anything was found (inputs saved
under --artifacts).

    python bench/fuzz/run.py [--seconds 60] [--targets header,hashes] [--engine atheris]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import re
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TARGETS = (
    "header", "e2bbody", "hashes", "seektable", "seekable", "manifest", "regions", "handshake",
    "workingset",
)
# The address space a worker may use beyond what it has mapped once its target is loaded: an
# allocation sized by a claim in the input (a 1 GiB frame promised by 4 KiB of file) fails with
# MemoryError, a finding, instead of going unnoticed while the kernel hands out untouched pages.
# Honest inputs stay below it: MAX_LEN bytes of zstd expand to at most 128 MiB (256 MiB while
# the pieces are joined).
ADDRESS_SPACE_MARGIN = 512 << 20
MAX_LEN = 4096
HANDSHAKE_MEMORY = 64 << 20  # guest memory the handshake target's regions must fit
# libFuzzer dictionaries for the JSON formats: whole keys and values are hard to guess bytewise.
TOKENS = {
    "manifest": ["build_id", "parent_build_id", "generation", "base_build_id", "block_size",
                 "size", "compression", "frame_size", "compression_level", "created_at",
                 "fcsnap_version", "source", "stats", "blocks_total", "bytes_stored"],
    "regions": ["base_host_virt_addr", "size", "offset", "page_size", "page_size_kib"],
}
VALUES = ["null", "true", "0", "-1", "4096", "2097152", "18446744073709551616", "1e400", "[[[[",
          "{}", '"zstd"', '"none"', '"11111111-1111-4111-8111-111111111111"']


def load(target: str, scratch: Path) -> tuple[Callable[[bytes], None], list[bytes]]:
    """The check for one target and valid seed inputs. Imported here, inside the worker, so
    that atheris can instrument the fcsnap modules as they load. `scratch` is a directory the
    driver removes after the worker (libFuzzer ends the process without unwinding)."""
    import lz4.frame
    import zstandard

    from fcsnap.errors import FcsnapError
    from fcsnap.header import BLOCK_SIZES, encode, parse_header, to_records
    from fcsnap.header.e2b import PREFIX
    from fcsnap.header.format import METADATA, VERSION_MASK, Metadata
    from fcsnap.store.format.hashes import dump_hashes, parse_hashes
    from fcsnap.store.format.manifest import COMPRESSIONS, parse_manifest
    from fcsnap.store.format.seekable import (
        FOOTER,
        MAX_EXPANSION,
        MAX_FRAME_SIZE,
        SeekableReader,
        SeekableWriter,
        parse_seek_table,
    )
    from fcsnap.uffd import abi
    from fcsnap.uffd.handshake import UFFD_LINK, receive_handshake
    from fcsnap.uffd.regions import MAX_REGIONS, PAGE_SIZES, parse_regions
    from fcsnap.workingset import dump_working_set, parse_working_set

    def refused(e: FcsnapError) -> None:
        message = str(e)
        assert message and "\n" not in message, f"unclear error: {message!r}"

    def header(data: bytes) -> None:
        try:
            parsed = parse_header(data)
        except FcsnapError as e:
            return refused(e)
        assert sum(m.length for m in parsed.mappings) == parsed.metadata.size
        meta = parsed.metadata
        if meta.version & VERSION_MASK in (4, 5):  # fcsnap writes their mappings as version 3
            meta = Metadata(3, *(getattr(meta, f) for f in Metadata.__slots__[1:]))
            for info in parsed.builds_section.builds.values():
                for a, b in zip(info.frames, info.frames[1:], strict=False):
                    assert a.end_u <= b.start_u and a.end_c <= b.start_c
        again = parse_header(encode(meta, to_records(parsed.mappings)))
        assert again.mappings == parsed.mappings
        for m in parsed.mappings[:64]:
            assert parsed.lookup(m.offset).remaining == m.length

    def e2bbody(data: bytes) -> None:
        meta, body = data[: METADATA.size], data[METADATA.size :]
        frame = lz4.frame.compress(body, block_checksum=True, content_checksum=True)
        header(meta + PREFIX.pack(0, len(body)) + frame)

    def body_seed(path: Path) -> bytes:
        data = path.read_bytes()
        return data[: METADATA.size] + lz4.frame.decompress(data[METADATA.size + PREFIX.size :])

    def hashes(data: bytes) -> None:
        try:
            block_size, table = parse_hashes(data)
        except FcsnapError as e:
            return refused(e)
        assert block_size in BLOCK_SIZES
        assert dump_hashes(block_size, table.tobytes()) == data

    def seektable(data: bytes) -> None:
        # The first 4 bytes move the file size away from the tail's length (either way).
        tail = data[4:]
        file_size = max(0, len(tail) + int.from_bytes(data[:4], "little", signed=True))
        try:
            frames = parse_seek_table(tail, file_size)
        except FcsnapError as e:
            return refused(e)
        compressed = decompressed = 0
        for f in frames:
            assert (f.compressed_offset, f.decompressed_offset) == (compressed, decompressed)
            assert f.compressed_size > 0 and 0 < f.decompressed_size <= MAX_FRAME_SIZE
            assert f.decompressed_size <= f.compressed_size * MAX_EXPANSION
            compressed += f.compressed_size
            decompressed += f.decompressed_size
        assert compressed < file_size and len(frames) * 8 + FOOTER.size <= len(tail)

    seekable_path = scratch / "input.zst"

    def seekable_file(data: bytes) -> None:
        seekable_path.write_bytes(data)
        try:
            reader = SeekableReader(seekable_path, cache_bytes=0, verify_checksums=True)
        except FcsnapError as e:
            return refused(e)
        with reader:
            total = 0
            for i, frame in enumerate(reader.frames[:64]):
                try:
                    got = reader.read_frame(i)
                except FcsnapError as e:
                    refused(e)
                    continue
                assert len(got) == frame.decompressed_size
                total += len(got)
            assert total <= len(data) * MAX_EXPANSION

    uffd = abi.userfaultfd()  # each execution sends a dup of it
    fd_patterns: list[tuple[list[str], list[str]]] = [  # fds sent with the first, second chunk
        (["uffd"], []), ([], []), ([], ["uffd"]), (["pipe"], []), (["pipe", "uffd"], []),
        (["uffd", "devnull"], ["uffd"]), (["devnull"] * 9 + ["uffd"], []), (["uffd"], ["pipe"]),
    ]

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def handshake(data: bytes) -> None:
        # data[0]: the fds (bits 0-2) and how the sender ends (bits 3-4: hang up, quiet, stop);
        # data[1]: where the payload is cut in two sends; the rest: the payload.
        if len(data) < 2:
            return
        pattern, ending = fd_patterns[data[0] & 7], ("hangup", "quiet", "stop", "hangup")[
            data[0] >> 3 & 3]
        payload = data[2:]
        cut = len(payload) * data[1] // 255
        before = open_fds()
        server, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        stop_r, stop_w = os.pipe()
        made: list[int] = []
        result = None
        try:
            for chunk, kinds in zip((payload[:cut], payload[cut:]), pattern, strict=True):
                fds = []
                for kind in kinds:
                    if kind == "uffd":
                        fds.append(os.dup(uffd))
                    elif kind == "pipe":
                        r, w = os.pipe()
                        made.append(r)
                        fds.append(w)
                    else:
                        fds.append(os.open(os.devnull, os.O_RDONLY))
                made.extend(fds)
                if chunk:  # fds without a payload byte are not sent on a stream socket
                    socket.send_fds(client, [chunk], fds)
            if ending == "hangup":
                client.shutdown(socket.SHUT_WR)
            elif ending == "stop":
                os.write(stop_w, b"x")
            try:
                result = receive_handshake(server, HANDSHAKE_MEMORY, 0.001, stop_r)
            except FcsnapError as e:
                refused(e)
        finally:
            for fd in (*made, stop_r, stop_w):
                os.close(fd)
            server.close()
            client.close()
        if result is not None:
            regions, received, extra = result
            try:
                assert os.readlink(f"/proc/self/fd/{received}") == UFFD_LINK
                assert not os.get_blocking(received) and extra >= 0
                assert 0 < len(regions) <= MAX_REGIONS
                assert all(r.offset + r.size <= HANDSHAKE_MEMORY for r in regions)
            finally:
                os.close(received)
            assert ending != "stop", "a stop request was not honoured"
        assert open_fds() == before, "an fd that arrived was neither handed over nor closed"

    def manifest(data: bytes) -> None:
        try:
            parsed = parse_manifest(data)
        except FcsnapError as e:
            return refused(e)
        assert parsed.block_size in BLOCK_SIZES and parsed.compression in COMPRESSIONS
        assert parsed.size > 0 and parsed.size % parsed.block_size == 0
        assert (parsed.parent_build_id is None) == (parsed.generation == 0)
        assert parse_manifest(json.dumps(parsed.to_json()).encode()) == parsed

    def regions(data: bytes) -> None:
        memory_size = int.from_bytes(data[:8], "little")
        try:
            parsed = parse_regions(data[8:], memory_size)
        except FcsnapError as e:
            return refused(e)
        assert 0 < len(parsed) <= MAX_REGIONS
        for r in parsed:
            assert r.page_size in PAGE_SIZES and r.size > 0
            assert not (r.base | r.size | r.offset) % r.page_size
            assert r.offset + r.size <= memory_size and r.end <= 1 << 64
        for a, b in zip(parsed, parsed[1:], strict=False):
            assert a.end <= b.base
        by_offset = sorted(parsed, key=lambda r: r.offset)
        for a, b in zip(by_offset, by_offset[1:], strict=False):
            assert a.offset + a.size <= b.offset

    def workingset(data: bytes) -> None:
        try:
            size, offsets = parse_working_set(data)
        except FcsnapError as e:
            return refused(e)
        assert ((offsets >= 0) & (offsets < size) & (offsets % 4096 == 0)).all()
        assert len(set(offsets.tolist())) == len(offsets)
        assert dump_working_set(size, offsets.tolist()) == data

    def seekable(chunks: list[bytes], frame_size: int, checksums: bool) -> bytes:
        out = io.BytesIO()
        with SeekableWriter(out, frame_size, checksums=checksums) as writer:
            for chunk in chunks:
                writer.write(chunk)
        return out.getvalue()

    gen0 = "11111111-1111-4111-8111-111111111111"
    base = {
        "build_id": gen0, "parent_build_id": None, "generation": 0, "base_build_id": gen0,
        "block_size": 4096, "size": 1 << 20, "compression": "none", "frame_size": None,
        "created_at": "2025-01-01T00:00:00+00:00", "fcsnap_version": "0.1.0", "source": "m",
        "stats": {"blocks_total": 256, "blocks_stored": 3, "bytes_stored": 12288},
    }
    child = base | {
        "build_id": "22222222-2222-4222-8222-222222222222", "parent_build_id": gen0,
        "generation": 1, "compression": "zstd", "frame_size": 262144, "compression_level": 3,
    }
    region = {"base_host_virt_addr": 0x7F0000000000, "size": 1 << 20, "offset": 0}
    memory = (2 << 20).to_bytes(8, "little")
    files = [seekable([b"a" * 5000, bytes(9000)], 4096, True), seekable([b"xyz" * 999], 1024,
                                                                          False)]
    unsized = zstandard.ZstdCompressor(write_content_size=False)  # as other writers make them
    frames = [unsized.compress(b"q" * 3000), unsized.compress(bytes(range(256)) * 4)]
    entries = b"".join(struct.pack("<II", len(f), n) for f, n in zip(frames, (3000, 1024),
                                                                        strict=True))
    files.append(b"".join(frames) + struct.pack("<II", 0x184D2A5E, len(entries) + 9) + entries
                 + struct.pack("<IBI", 2, 0, 0x8F92EAB1))
    e2b_headers = sorted((ROOT / "fixtures/e2b").rglob("*.header"))
    seeds = {
        "header": [p.read_bytes() for p in sorted((ROOT / "fixtures/headers").glob("*.header"))]
        + [p.read_bytes() for p in e2b_headers],
        "e2bbody": [body_seed(p) for p in e2b_headers
                    if METADATA.unpack_from(p.read_bytes())[0] in (4, 5)],
        "hashes": [dump_hashes(4096, bytes(range(48))), dump_hashes(2 << 20, b""),
                   dump_hashes(4096, bytes(16))],
        "seektable": [bytes(4) + f for f in files]
        + [(len(f) - 57).to_bytes(4, "little") + f[-57:] for f in files],
        "seekable": files,
        "manifest": [json.dumps(base).encode(), json.dumps(child, indent=2).encode()],
        "regions": [
            memory + json.dumps([region]).encode(),
            memory + json.dumps([region | {"page_size_kib": 4096}]).encode(),
            memory + json.dumps([
                region | {"page_size": 2 << 20, "page_size_kib": 2 << 20},
                {"base_host_virt_addr": 0x7F1000000000, "size": 1 << 20, "offset": 1 << 20},
            ]).encode(),
        ],
        "handshake": [bytes([flags, cut]) + json.dumps(r).encode()
                      for flags, cut, r in [(0, 255, [region]), (2, 100, [region]),
                                            (8, 255, [region]), (16, 40, [region]),
                                            (4, 255, [region, region])]],
        "workingset": [dump_working_set(1 << 20, [0x5000, 0, 0xFF000]),
                       dump_working_set(8192, [])],
    }[target]
    check = {"header": header, "e2bbody": e2bbody, "hashes": hashes, "seektable": seektable,
             "seekable": seekable_file, "manifest": manifest, "regions": regions,
             "handshake": handshake, "workingset": workingset}[target]
    return check, seeds


def cap_address_space() -> None:
    """Allow ADDRESS_SPACE_MARGIN more than is mapped now (the target loaded)."""
    status = Path("/proc/self/status").read_text().splitlines()
    mapped = next(int(line.split()[1]) << 10 for line in status if line.startswith("VmSize:"))
    limit = mapped + ADDRESS_SPACE_MARGIN
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def save(artifacts: Path, target: str, data: bytes) -> Path:
    artifacts.mkdir(parents=True, exist_ok=True)
    path = artifacts / f"{target}-{hashlib.sha1(data).hexdigest()[:16]}"
    path.write_bytes(data)
    return path


# -- workers (one process per target) ---------------------------------------------------------


def work_atheris(target: str, seconds: int, artifacts: Path, scratch: Path) -> None:
    import atheris

    with atheris.instrument_imports(include=["fcsnap"]):
        check, seeds = load(target, scratch)
    cap_address_space()
    corpus = scratch / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(seeds):
        (corpus / f"seed-{i}").write_bytes(seed)
    artifacts.mkdir(parents=True, exist_ok=True)
    flags = [
        f"-max_total_time={seconds}", f"-max_len={MAX_LEN}", "-timeout=10",
        "-rss_limit_mb=2048", "-print_final_stats=1", f"-artifact_prefix={artifacts}/{target}-",
    ]
    if target in TOKENS:
        words = [json.dumps(f'"{key}"') for key in TOKENS[target]] + [
            json.dumps(value) for value in VALUES
        ]
        (scratch / "dict").write_text("".join(f"{word}\n" for word in words))
        flags.append(f"-dict={scratch / 'dict'}")
    atheris.Setup([sys.argv[0], *flags, str(corpus)], check)
    atheris.Fuzz()  # does not return: libFuzzer exits the process


def work_hypothesis(target: str, seconds: int, artifacts: Path, scratch: Path) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    check, seeds = load(target, scratch)
    cap_address_space()

    @st.composite
    def mutated(draw: st.DrawFn) -> bytes:
        blob = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(0, 6))):
            if blob:
                blob[draw(st.integers(0, len(blob) - 1))] = draw(st.integers(0, 255))
        start = draw(st.integers(0, len(blob)))
        return bytes(blob[:start]) + draw(st.binary(max_size=16)) + bytes(
            blob[start + draw(st.integers(0, 16)) :]
        )

    runs = 0
    current = b""

    @settings(max_examples=2000, deadline=None, database=None, derandomize=False,
              phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=MAX_LEN) | mutated())
    def one(data: bytes) -> None:
        nonlocal runs, current
        runs += 1
        current = data
        check(data)

    deadline = time.monotonic() + seconds
    findings = 0
    while time.monotonic() < deadline:
        try:
            one()
        except Exception:
            findings += 1
            path = save(artifacts, target, current)
            print(f"finding: {path}\n{traceback.format_exc()}", file=sys.stderr)
            break
    print(f"Done {runs} runs in {seconds} second(s)", file=sys.stderr)
    sys.exit(1 if findings else 0)


# -- the driver -------------------------------------------------------------------------------


def run_target(target: str, engine: str, seconds: int, artifacts: Path) -> dict[str, Any]:
    before = set(artifacts.glob(f"{target}-*")) if artifacts.is_dir() else set()
    started = time.monotonic()
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None  # the seekable target writes a lot
    scratch = Path(tempfile.mkdtemp(prefix=f"fcsnap-fuzz-{target}-", dir=shm))
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--worker", target, "--engine", engine,
             "--seconds", str(seconds), "--artifacts", str(artifacts), "--scratch", str(scratch)],
            capture_output=True, text=True, timeout=seconds * 3 + 120,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log = done.stderr
    runs = re.findall(r"Done (\d+) runs|stat::number_executed_units: (\d+)|^#(\d+)\s", log, re.M)
    executions = max((int(x) for groups in runs for x in groups if x), default=0)
    coverage = re.findall(r"\bcov: (\d+) ft: (\d+)", log)
    new = sorted(set(artifacts.glob(f"{target}-*")) - before) if artifacts.is_dir() else []
    failed = done.returncode != 0
    return {
        "target": target,
        "engine": engine,
        "executions": executions,
        "seconds": round(time.monotonic() - started, 1),
        "coverage": {"edges": int(coverage[-1][0]), "features": int(coverage[-1][1])}
        if coverage else None,
        "findings": len(new) or int(failed),
        "artifacts": [str(p) for p in new],
        "log_tail": log.strip().splitlines()[-25:] if failed else [],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60, help="per target")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated")
    has_atheris = importlib.util.find_spec("atheris") is not None
    parser.add_argument(
        "--engine", choices=("atheris", "hypothesis"),
        default="atheris" if has_atheris else "hypothesis",
    )
    parser.add_argument("--artifacts", type=Path, default=Path("fuzz-findings"),
                        help="where inputs that found something are saved")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", choices=TARGETS, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    artifacts = args.artifacts.resolve()
    if args.worker:
        os.chdir(tempfile.gettempdir())  # libFuzzer may drop files in the working directory
        work = work_atheris if args.engine == "atheris" else work_hypothesis
        work(args.worker, args.seconds, artifacts, args.scratch)
        return
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}: choose from {', '.join(TARGETS)}")
    results = []
    print(f"{'target':<11} {'engine':<10} {'executions':>11} {'exec/s':>8} {'edges':>6}  findings")
    for target in targets:
        r = run_target(target, args.engine, args.seconds, artifacts)
        results.append(r)
        edges = r["coverage"]["edges"] if r["coverage"] else "-"
        rate = r["executions"] / max(r["seconds"], 0.1)
        print(f"{target:<11} {r['engine']:<10} {r['executions']:>11} {rate:>8.0f} {edges:>6}  "
              f"{r['findings']}", flush=True)
        for line in r["log_tail"]:
            print(f"    {line}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    sys.exit(1 if any(r["findings"] for r in results) else 0)


if __name__ == "__main__":
    main()
