"""A longer fuzz run over every parser of untrusted bytes: for each input a correct result or an
FcsnapError with a message, never another exception, never memory in proportion to a claim.

Targets: header (memfile.header), hashes (memfile.hashes), seektable (zstd seekable seek table),
manifest (build.json), regions (Firecracker's UFFD handshake), workingset (--prefetch-ws files).
Each target runs in its own process for --seconds, with atheris (coverage-guided libFuzzer) when
it is installed and hypothesis otherwise, starting from valid inputs of that format. Prints the
executions and findings per target; exits 1 when anything was found (inputs saved under
--artifacts).

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
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ("header", "hashes", "seektable", "manifest", "regions", "workingset")
# The address space a worker may use: an allocation sized by a claim in the input fails with
# MemoryError (a finding) instead of going unnoticed while the kernel hands out untouched pages.
ADDRESS_SPACE = 8 << 30
MAX_LEN = 4096
# libFuzzer dictionaries for the JSON formats: whole keys and values are hard to guess bytewise.
TOKENS = {
    "manifest": ["build_id", "parent_build_id", "generation", "base_build_id", "block_size",
                 "size", "compression", "frame_size", "compression_level", "created_at",
                 "fcsnap_version", "source", "stats", "blocks_total", "bytes_stored"],
    "regions": ["base_host_virt_addr", "size", "offset", "page_size", "page_size_kib"],
}
VALUES = ["null", "true", "0", "-1", "4096", "2097152", "18446744073709551616", "1e400", "[[[[",
          "{}", '"zstd"', '"none"', '"11111111-1111-4111-8111-111111111111"']


def load(target: str) -> tuple[Callable[[bytes], None], list[bytes]]:
    """The check for one target and valid seed inputs. Imported here, inside the worker, so
    that atheris can instrument the fcsnap modules as they load."""
    from fcsnap.errors import FcsnapError
    from fcsnap.header import BLOCK_SIZES, dump_header, parse_header
    from fcsnap.store.hashes import dump_hashes, parse_hashes
    from fcsnap.store.manifest import COMPRESSIONS, parse_manifest
    from fcsnap.store.seekable import FOOTER, MAX_FRAME_SIZE, SeekableWriter, parse_seek_table
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
        assert parse_header(dump_header(parsed)) == parsed
        for m in parsed.mappings[:64]:
            assert parsed.lookup(m.offset).remaining == m.length

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
            compressed += f.compressed_size
            decompressed += f.decompressed_size
        assert compressed < file_size and len(frames) * 8 + FOOTER.size <= len(tail)

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
    seeds = {
        "header": [p.read_bytes() for p in sorted((ROOT / "fixtures/headers").glob("*.header"))],
        "hashes": [dump_hashes(4096, bytes(range(48))), dump_hashes(2 << 20, b""),
                   dump_hashes(4096, bytes(16))],
        "seektable": [bytes(4) + f for f in files]
        + [(len(f) - 57).to_bytes(4, "little") + f[-57:] for f in files],
        "manifest": [json.dumps(base).encode(), json.dumps(child, indent=2).encode()],
        "regions": [
            memory + json.dumps([region]).encode(),
            memory + json.dumps([region | {"page_size_kib": 4096}]).encode(),
            memory + json.dumps([
                region | {"page_size": 2 << 20, "page_size_kib": 2 << 20},
                {"base_host_virt_addr": 0x7F1000000000, "size": 1 << 20, "offset": 1 << 20},
            ]).encode(),
        ],
        "workingset": [dump_working_set(1 << 20, [0x5000, 0, 0xFF000]),
                       dump_working_set(8192, [])],
    }[target]
    check = {"header": header, "hashes": hashes, "seektable": seektable, "manifest": manifest,
             "regions": regions, "workingset": workingset}[target]
    return check, seeds


def save(artifacts: Path, target: str, data: bytes) -> Path:
    artifacts.mkdir(parents=True, exist_ok=True)
    path = artifacts / f"{target}-{hashlib.sha1(data).hexdigest()[:16]}"
    path.write_bytes(data)
    return path


# -- workers (one process per target) ---------------------------------------------------------


def work_atheris(target: str, seconds: int, artifacts: Path) -> None:
    import atheris

    with atheris.instrument_imports(include=["fcsnap"]):
        check, seeds = load(target)
    scratch = Path(tempfile.mkdtemp(prefix=f"fcsnap-fuzz-{target}-"))
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
    try:
        atheris.Fuzz()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def work_hypothesis(target: str, seconds: int, artifacts: Path) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    check, seeds = load(target)

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
    done = subprocess.run(
        [sys.executable, __file__, "--worker", target, "--engine", engine,
         "--seconds", str(seconds), "--artifacts", str(artifacts)],
        capture_output=True, text=True, timeout=seconds * 3 + 120,
    )
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
    args = parser.parse_args()
    artifacts = args.artifacts.resolve()
    if args.worker:
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
        os.chdir(tempfile.gettempdir())  # libFuzzer may drop files in the working directory
        work = work_atheris if args.engine == "atheris" else work_hypothesis
        work(args.worker, args.seconds, artifacts)
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
