"""Which merge of recorded working sets gets a restored guest its working set soonest.

The stand-in is the guest. Every run touches the same working set (--ws-fraction of the pages,
chosen by --ws-seed 1, in one fixed random order) and then --extra of the pages at random,
chosen by the run's own seed: what only that run needed. RUNS runs are recorded with
`restore --record-ws` (default options: one page per fault); `fcsnap ws merge --min-runs K`
merges them for every K, and one recording alone is the baseline. For each, the memory file is
packed with that working set first, and a new run (its own extra pages) is served with
`--prefetch-ws`, pinned (server and stand-in on CPU 0), median of --repeat: the time to the
working set, and to the end of the extra pages.

    python bench/ws_merge.py --corpus DIR [--runs 3] [--repeat 3] [--workdir /var/tmp]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import restore as bench

from fcsnap.workingset import parse_working_set

SEED_NEW_RUN = 99


def standin(size: int, seed: int, ws_fraction: float, extra: float) -> dict[str, object]:
    return {"threads": 1, "size": size, "ws_fraction": ws_fraction, "ws_seed": 1,
            "seed": seed, "touch": extra, "order": "random", "verify_bytes": False}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ws-fraction", type=float, default=0.1)
    parser.add_argument("--extra", type=float, default=0.03)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args()
    memfile, size, _, _ = bench.corpus_guest(args.corpus)
    work = Path(tempfile.mkdtemp(prefix="fcsnap-ws-merge-", dir=args.workdir))
    try:
        store = work / "store"
        build = bench.pack(memfile, store)
        recorded = []
        for run in range(1, args.runs + 1):
            path = work / f"run{run}.ws"
            bench.serve(work, build, ["--record-ws", str(path)],
                        standin(size, run, args.ws_fraction, args.extra), pinned=False)
            recorded.append(path)
        sets = {"one recording": recorded[0]}
        for k in range(args.runs, 0, -1):
            out = work / f"merged-{k}.ws"
            bench.fcsnap("ws", "merge", *map(str, recorded), "--min-runs", str(k), "-o",
                         str(out), "--quiet")
            name = "intersection" if k == args.runs else "union" if k == 1 else "at least"
            sets[f"{name} (K={k} of {args.runs})"] = out
        builds = {name: bench.pack(memfile, store, "--working-set", str(path))
                  for name, path in sets.items()}
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in sets}
        for i in range(args.repeat):
            for name, path in sets.items():
                print(f"ws merge {i + 1}/{args.repeat}: {name}", file=sys.stderr)
                bench.warm([f for f in builds[name].iterdir() if f.is_file()])
                run = bench.serve(work, builds[name], ["--prefetch-ws", str(path)],
                                  standin(size, SEED_NEW_RUN, args.ws_fraction, args.extra),
                                  pinned=True)
                times[name].append((run.ws_s, run.all_s))
        core = round(args.ws_fraction * size / 4096)
        lines = [
            "## Merging recorded working sets",
            "",
            f"{memfile.name} of {args.corpus}: every run touches the same {core} pages "
            f"(the working set) and then {args.extra:.0%} of the pages at random (its own). "
            f"{args.runs} runs recorded; a new run served with each merge prefetched, pinned, "
            f"median of {args.repeat}. Times from the guest's first touch.",
            "",
            "| working set | pages | time to working set ms | then its own pages ms |",
            "|---|---:|---:|---:|",
        ]
        for name, path in sets.items():
            pages = len(parse_working_set(path.read_bytes())[1])
            ws = statistics.median(t[0] for t in times[name]) * 1e3
            rest = statistics.median(t[1] for t in times[name]) * 1e3
            lines.append(f"| {name} | {pages} | {ws:.1f} | {rest:.1f} |")
        text = "\n".join(lines) + "\n"
        bench.RESULTS.mkdir(exist_ok=True)
        (bench.RESULTS / "ws-merge-corpus.md").write_text(text)
        print(text)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
