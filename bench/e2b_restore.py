"""restore of the same memory from an E2B V4 zstd-framed build and from an fcsnap zstd build,
local and from S3 (cold and warm host cache), side by side in one run.

A synthetic guest image is packed as an fcsnap zstd build (its default 256 KiB frames) and
exported from it as an E2B store (`fcsnap export --compress zstd`: V4 header, E2B's 2 MiB
frames). Both are uploaded to one SeaweedFS server started here (127.0.0.1, sharing the
machine's cores), the E2B store laid out as E2B lays out its bucket. Each way is served to the
Firecracker stand-in (2 threads: a random working set of 10% of the pages, then every page),
which reports the time to its working set and to all memory; median of --repeat, the ways
taken in turns in each round. The target: E2B within 1.2x of fcsnap for each. Results go to
bench/results/e2b-restore.{md,json}.

    python bench/e2b_restore.py [--size 128M] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import s3 as s3bench  # noqa: E402

from fcsnap import api  # noqa: E402
from fcsnap.store.backends.remote import RemoteStore  # noqa: E402
from fcsnap.store.backends.s3 import S3Objects, parse_s3_url  # noqa: E402
from fcsnap.store.operations import ops, transfer  # noqa: E402
from fcsnap.store.operations.builder import BuildOptions  # noqa: E402
from fcsnap.testing.memimage import synthetic_memory, write_full  # noqa: E402
from fcsnap.testing.s3server import seaweedfs  # noqa: E402
from fcsnap.units import parse_size  # noqa: E402

RESULTS = HERE / "results"
WAYS = ("local", "s3 cold", "s3 warm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="128M")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    size = parse_size(args.size, "size")
    with tempfile.TemporaryDirectory(prefix="fcsnap-bench-e2b-") as tmp_text:
        tmp = Path(tmp_text)
        mem = tmp / "mem"
        write_full(mem, synthetic_memory(size, seed=7))
        local = tmp / "store"
        build = Path(ops.pack(mem, local, BuildOptions(compression="zstd"))[1])
        e2b = tmp / "e2b"
        api.Store(local).export_e2b(build.name, e2b, compress="zstd")
        with seaweedfs(tmp / "weed") as server:
            server.create_bucket("bench")
            os.environ.update(server.env())
            transfer.copy_lineage(build.name, local, RemoteStore(
                S3Objects(parse_s3_url("s3://bench/fc")), tmp / "mirror"), "push")
            objects = S3Objects(parse_s3_url("s3://bench/e2b"))
            for path in sorted(e2b.rglob("*")):
                if path.is_file():
                    objects.upload(str(path.relative_to(e2b)), path)
            stores = {"fcsnap": {"local": str(local), "s3": "s3://bench/fc"},
                      "e2b": {"local": str(e2b), "s3": "s3://bench/e2b"}}
            runs: dict[str, list[dict]] = {f"{f} {w}": [] for w in WAYS for f in stores}
            for i in range(args.repeat):
                for way in WAYS:
                    for fmt, where in stores.items():
                        cache = tmp / f"cache-{fmt}-{i}"
                        if way == "s3 cold":
                            shutil.rmtree(cache, ignore_errors=True)
                        store = where["local" if way == "local" else "s3"]
                        extra = [] if way == "local" else ["--cache-dir", str(cache)]
                        runs[f"{fmt} {way}"].append(
                            s3bench.restore_once(tmp, build.name, store, extra, size))
    served = {way: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
              for way, rs in runs.items()}
    ratios = {way: {k: served[f"e2b {way}"][k] / served[f"fcsnap {way}"][k]
                    for k in ("ws_s", "all_s")} for way in WAYS}
    result = {"size": size, "repeat": args.repeat, "cpus": os.cpu_count(),
              "frames": {"fcsnap": "256 KiB", "e2b": "2 MiB"}, "served": served,
              "e2b_over_fcsnap": ratios, "target": 1.2}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "e2b-restore.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"restore of {size >> 20} MiB of synthetic memory, zstd, median of {args.repeat} "
        "(stand-in: 2 threads, a 10% working set, then all pages)", "",
        "| from | fcsnap ws s | E2B ws s | E2B/fcsnap ws | fcsnap all s | E2B all s | "
        "E2B/fcsnap all |", "|---|---|---|---|---|---|---|",
    ]
    for way in WAYS:
        f, e, r = served[f"fcsnap {way}"], served[f"e2b {way}"], ratios[way]
        lines.append(f"| {way} | {f['ws_s']:.3f} | {e['ws_s']:.3f} | {r['ws_s']:.2f}x | "
                     f"{f['all_s']:.3f} | {e['all_s']:.3f} | {r['all_s']:.2f}x |")
    (RESULTS / "e2b-restore.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
