"""pack straight into S3 against a plain multipart upload of its output; restore from S3 with a
cold and a warm chunk cache against the same restore from a local store. All in one run.

A guest image is packed three ways, against one SeaweedFS server started here (`weed mini`,
127.0.0.1; server and client share the machine's cores). The image is synthetic
(fcsnap.testing.memimage) by default; with --corpus it is the real guest of bench/corpus.py
(the newest generation of the cached 256 MiB corpus, or of the corpus directory given), and
the working set of the --prefetch-ws rows is recorded from that guest:

- `local`: into a local store (fsynced, as pack publishes), for reference;
- `upload`: the local build's files uploaded as they are (obstore, multipart in 8 MiB parts, 4
  in flight: what pack uses), i.e. the cost of getting pack's output into S3 when it exists;
- `s3`: pack with `--store s3://...`: the diff streams up while it is produced.

fcsnap is timed through its Python API (no interpreter start-up). Each way runs --repeat times
(the upload and the pack into S3 in turns); the best counts. The target: pack to S3 at >= 0.8x
the throughput of the plain upload of its output (throughput = diff bytes / seconds). The CPU
seconds of this process (the client: scan, compression, obstore) and of the server are given
per way: with both on one machine, the server's CPU is what an upload waits for, and pack's own
CPU competes with it.

Restore: the build is served to the Firecracker stand-in (2 threads: a random working set of
10% of the pages, then every page), from the local store, from S3 with an empty cache
directory (cold), and from S3 again with that cache (warm: a second VM on the host); the
stand-in reports the time to its working set and to all memory; median of --repeat. Each
round runs the cold ways first; then local and warm take --repeat more turns from the last
round's cache with no cold restore between (a second VM once the host's fetching is over).
Results go to bench/results/s3-<compression>.{md,json} (s3-corpus-<compression>.* with --corpus;
-pinned added with --pin).

    python bench/s3.py [--size 256M | --corpus [DIR]] [--compress none|zstd] [--repeat 3] [--pin 0]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fcsnap.store.backends.chunk_cache import CHUNK, IN_FLIGHT  # noqa: E402
from fcsnap.store.backends.remote import RemoteStore  # noqa: E402
from fcsnap.store.backends.s3 import S3Objects, parse_s3_url  # noqa: E402
from fcsnap.store.operations import ops  # noqa: E402
from fcsnap.store.operations.builder import BuildOptions  # noqa: E402
from fcsnap.testing import firecracker  # noqa: E402
from fcsnap.testing.memimage import synthetic_memory, write_full  # noqa: E402
from fcsnap.testing.s3server import seaweedfs  # noqa: E402
from fcsnap.units import parse_size  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CACHED = "cached"  # --corpus without a directory: the corpus bench/corpus.py cached


@dataclass(frozen=True)
class Timed:
    seconds: float
    client_cpu: float  # this process: scan, compression, obstore's threads
    server_cpu: float  # the S3 server's process


def cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_children() -> float:
    """CPU seconds of this process's live children (the S3 server), from /proc."""
    ticks = 0
    for task in Path("/proc/self/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def best(runs: int, fn) -> Timed:  # noqa: ANN001
    """The fastest of `runs` calls, with the CPU it took."""
    timed = []
    for _ in range(runs):
        client, server, start = cpu_self(), cpu_children(), time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        timed.append(Timed(seconds, cpu_self() - client, cpu_children() - server))
    return min(timed, key=lambda t: t.seconds)


def guest(args: argparse.Namespace, tmp: Path) -> tuple[Path, int, dict | None]:
    """The memory file to pack, its size, and the corpus it comes from (None: synthetic)."""
    if args.corpus is not None:
        import corpus as corpus_mod

        found = (corpus_mod.cached_corpus() if args.corpus == CACHED
                 else corpus_mod.Corpus(Path(args.corpus), json.loads(
                     (Path(args.corpus) / "manifest.json").read_text())))
        if found is not None:
            newest = found.images[-1]
            return newest, newest.stat().st_size, {"path": str(found.path),
                                                   "file": newest.name}
        print(f"bench/s3.py: no corpus cached in {corpus_mod.DEFAULT_CACHE} (python "
              "bench/corpus.py builds it); using the synthetic guest", file=sys.stderr)
    size = parse_size(args.size, "size")
    mem = tmp / "mem"
    write_full(mem, synthetic_memory(size, seed=7))
    return mem, size, None


PIN: list[str] = []  # --pin CPU: the command prefix that runs restore and stand-in on it


def restore_once(work: Path, build: str, store: str, extra: list[str], size: int,
                 touch: float = 1.0) -> dict:
    """One restore and one stand-in (both on one core with --pin); the stand-in's times and
    the server's stats."""
    sock, stats, report = work / "uffd.sock", work / "stats.json", work / "vm.json"
    # Every way starts from the same quiet machine: the cache files a cold run just wrote are
    # on disk, not being written back under the next run.
    os.sync()
    time.sleep(0.5)
    for path in (stats, report):
        path.unlink(missing_ok=True)
    server = subprocess.Popen(
        [*PIN, sys.executable, "-m", "fcsnap", "restore", "--vm", build, "--store", store,
         "--socket", str(sock), "--stats", str(stats), "--quiet", *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not sock.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"restore did not listen: {server.stderr.read().decode()}")
        time.sleep(0.005)
    vm = subprocess.Popen([*PIN, *firecracker.command(
        sock, report=report, threads=2, ws_fraction=0.1, seed=3, size=size, verify_bytes=False,
        deadline=120, touch=touch)])
    vm_status = vm.wait(timeout=180)
    _, err = server.communicate(timeout=60)
    if vm_status or server.returncode:
        raise RuntimeError(f"stand-in {vm_status}, server {server.returncode}: {err.decode()}")
    r, st = firecracker.read_report(report), json.loads(stats.read_text())
    return {"ws_s": r.get("ws_s", r["touch_s"]), "all_s": r.get("all_s", r["touch_s"]),
            "fetched_bytes": st.get("fetched_bytes", 0)}


def fetch_floor(objects: S3Objects, key: str, size: int, repeat: int) -> float:
    """Seconds to read the whole object as the host cache does (4 MiB range GETs, IN_FLIGHT at
    once) with nothing else running, best of `repeat`: no restore from a cold cache can have
    all of a raw build sooner."""
    ranges = [(at, min(CHUNK, size - at)) for at in range(0, size, CHUNK)]
    best = float("inf")
    for _ in range(repeat):
        began = time.perf_counter()
        with ThreadPoolExecutor(IN_FLIGHT) as pool:
            list(pool.map(lambda r: objects.get_range(key, *r), ranges))
        best = min(best, time.perf_counter() - began)
    return best


def restores(tmp: Path, builds: dict[str, str], local: Path, remote_url: str, size: int,
             ws: Path, repeat: int) -> dict[str, dict[str, float]]:
    """`builds`: the plain build and the one laid out with the working set first."""
    # The cold ways first in each round, then local and warm side by side: a warm restore run
    # right after a cold one shared the cores with the S3 server's own work after the load.
    ways = {
        "s3 cold": (builds["plain"], remote_url, ["cache"]),
        "s3 cold --prefetch-ws": (builds["ws"], remote_url, ["ws", "cache"]),
        "local": (builds["plain"], str(local), []),
        "s3 warm": (builds["plain"], remote_url, ["cache", "warm"]),
        "local --prefetch-ws": (builds["ws"], str(local), ["ws"]),
    }
    runs: dict[str, list[dict]] = {
        way: [] for way in [*ways, "local, in turns with warm", "s3 warm, in turns with local"]
    }
    for i in range(repeat):
        for way, (build, store, flags) in ways.items():
            cache = tmp / f"cache-{i}-{build}"
            if "cache" in flags and "warm" not in flags:
                shutil.rmtree(cache, ignore_errors=True)
            extra = ["--cache-dir", str(cache)] if "cache" in flags else []
            extra += ["--prefetch-ws", str(ws)] if "ws" in flags else []
            runs[way].append(restore_once(tmp, build, store, extra, size))
    # A second VM on a host whose S3 fetching is over: local and warm in turns, from the last
    # round's cache, no cold restore in between (the rounds above put one before each).
    build, cache = builds["plain"], tmp / f"cache-{repeat - 1}-{builds['plain']}"
    for _ in range(repeat):
        runs["local, in turns with warm"].append(restore_once(tmp, build, str(local), [], size))
        runs["s3 warm, in turns with local"].append(
            restore_once(tmp, build, remote_url, ["--cache-dir", str(cache)], size))
    return {
        way: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
        for way, rs in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256M")
    parser.add_argument("--compress", default="none", choices=("none", "zstd"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--corpus", nargs="?", const=CACHED, metavar="DIR",
                        help="pack and serve the real guest of bench/corpus.py: its cached "
                        "256 MiB corpus, or the corpus in DIR (--size is then the corpus's); "
                        "synthetic memory when none is cached")
    parser.add_argument("--pin", metavar="CPU",
                        help="run each restore and its stand-in on this CPU (taskset -c): "
                        "cross-core wakeups are slow on some VMs; the S3 server is not pinned")
    args = parser.parse_args()
    if args.pin is not None:
        PIN[:] = ["taskset", "-c", args.pin]
    options = BuildOptions(compression=args.compress)
    with tempfile.TemporaryDirectory(prefix="fcsnap-bench-s3-") as tmp_text:
        tmp = Path(tmp_text)
        mem, size, corpus = guest(args, tmp)
        with seaweedfs(tmp / "weed") as server:
            server.create_bucket("bench")
            os.environ.update(server.env())
            objects = S3Objects(parse_s3_url("s3://bench/p"))
            remote = RemoteStore(objects, tmp / "mirror")
            local = tmp / "local"
            built: list[Path] = []

            def pack_local() -> None:
                built.append(Path(ops.pack(mem, local, options)[1]))

            def upload() -> None:
                build = built[-1]
                for path in sorted(build.iterdir()):
                    objects.upload(f"upload-{len(built)}/{build.name}/{path.name}", path)

            def pack_s3() -> None:
                ops.pack(mem, remote, options)

            t_local = best(args.repeat, pack_local)
            # taken in turns, so that a change in the machine's load hits both alike
            turns = [(best(1, upload), best(1, pack_s3)) for _ in range(args.repeat)]
            t_upload = min((u for u, _ in turns), key=lambda t: t.seconds)
            t_s3 = min((s for _, s in turns), key=lambda t: t.seconds)
            manifest = json.loads((built[-1] / "build.json").read_text())
            # the working set: recorded from a local restore touching only it, one page per
            # fault; then a build laid out with it first (pack --working-set)
            ws = tmp / "ws.bin"
            restore_once(tmp, built[-1].name, str(local),
                         ["--fault-around", "0", "--record-ws", str(ws)], size, touch=0)
            ws_options = BuildOptions(compression=args.compress, working_set=ws)
            builds = {"plain": built[-1].name,
                      "ws": Path(ops.pack(mem, local, ws_options)[1]).name}
            for build in builds.values():
                pushed = subprocess.run(
                    [sys.executable, "-m", "fcsnap", "push", build, "--from", str(local),
                     "--to", "s3://bench/served", "-q"], capture_output=True, text=True,
                    timeout=300,
                )
                if pushed.returncode:
                    raise RuntimeError(pushed.stderr)
            served = restores(tmp, builds, local, "s3://bench/served", size, ws, args.repeat)
            served_objects = S3Objects(parse_s3_url("s3://bench/served"))
            diff = next(info for info in served_objects.list(f"{builds['plain']}/")
                        if "/memfile.diff" in info.key)
            fetch_s = fetch_floor(served_objects, diff.key, diff.size, args.repeat)
    diff_bytes = manifest["stats"]["bytes_written"]
    mib = 1 << 20
    rows = {"local": t_local, "upload": t_upload, "s3": t_s3}
    labels = {"local": "pack into a local store",
              "upload": "plain multipart upload of that build",
              "s3": "pack straight into S3"}
    result = {
        "size": size, "compression": args.compress, "diff_bytes": diff_bytes,
        "corpus": corpus,
        "seconds": {k: v.seconds for k, v in rows.items()},
        "client_cpu_s": {k: round(v.client_cpu, 3) for k, v in rows.items()},
        "server_cpu_s": {k: round(v.server_cpu, 3) for k, v in rows.items()},
        "throughput_mib_s": {k: round(diff_bytes / mib / v.seconds, 1) for k, v in rows.items()},
        "s3_vs_upload": round(t_upload.seconds / t_s3.seconds, 3),
        "restore": served,
        "fetch_whole_diff_s": round(fetch_s, 3),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "pinned_cpu": args.pin,
    }
    cores = os.cpu_count() or 1
    floor = (t_s3.client_cpu + t_s3.server_cpu) / cores
    result["s3_best_possible_vs_upload"] = round(t_upload.seconds / max(floor, t_local.seconds), 3)
    stem = f"s3-corpus-{args.compress}" if corpus else f"s3-{args.compress}"
    stem += "-pinned" if args.pin is not None else ""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    what = (f"the real guest {corpus['file']} of {corpus['path']}" if corpus
            else "a synthetic guest")
    lines = [
        f"pack of {what} ({size // mib} MiB, {args.compress}), diff {diff_bytes / mib:.1f} "
        f"MiB; SeaweedFS on 127.0.0.1, {os.cpu_count()} cores shared (load average "
        f"{os.getloadavg()[0]:.1f} at the end); best of {args.repeat}",
        "",
        "| way | seconds | diff MiB/s | client CPU s | server CPU s |",
        "|---|---:|---:|---:|---:|",
        *(f"| {labels[k]} | {v.seconds:.2f} | {result['throughput_mib_s'][k]} | "
          f"{v.client_cpu:.2f} | {v.server_cpu:.2f} |" for k, v in rows.items()),
        "",
        f"pack into S3 / plain upload throughput: {result['s3_vs_upload']:.2f}x (target >= 0.8)",
        "",
        f"with server and client on these {cores} cores, pack into S3 cannot take less than "
        f"their CPU seconds / {cores} = {floor:.2f} s, nor less than the local pack: at best "
        f"{t_upload.seconds / max(floor, t_local.seconds):.2f}x",
        "",
        f"restore of {what}, median of {args.repeat} (stand-in: 2 threads, a 10% working set, "
        "then all; " + (f"restore and stand-in on CPU {args.pin})" if args.pin is not None
                        else "not pinned)"),
        "",
        "| from | working set s | all memory s | x local (ws / all) | fetched MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for way, r in served.items():
        base = served["local --prefetch-ws" if "prefetch" in way else
                      "local, in turns with warm" if "in turns" in way else "local"]
        lines.append(
            f"| {way} | {r['ws_s']:.3f} | {r['all_s']:.3f} | {r['ws_s'] / base['ws_s']:.2f} / "
            f"{r['all_s'] / base['all_s']:.2f} | {r['fetched_bytes'] / mib:.1f} |"
        )
    lines += [
        "",
        f"the whole diff fetched as the host cache fetches it ({IN_FLIGHT} range GETs of "
        f"{CHUNK >> 20} MiB in flight), nothing else running, best of {args.repeat}: "
        f"{fetch_s:.3f} s = {fetch_s / served['local']['all_s']:.2f}x the local restore's time "
        f"to all memory, {fetch_s / served['local --prefetch-ws']['all_s']:.2f}x with "
        "--prefetch-ws: no cold restore has all of it sooner",
    ]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
