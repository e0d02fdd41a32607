"""Pack/diff throughput: fcsnap against `cp --sparse=always` and `zstd -3 -T2`, side by side.

One synthetic guest image (fcsnap.testing.memimage) is written as a Full memory file on the real
disk; its next generation (1% of pages dirty) is written both as a Full file and as a sparse Diff
file. Every timed command ends with its output fsynced, because fcsnap publishes builds durably
(fsync, then rename) and a comparison that skips that for the tools would flatter them.

Every command is a whole process, timed from exec to exit, as a user runs it: fcsnap is
`python -m fcsnap pack|diff ... --json` with PYTHONPATH at the tree measured, so interpreter
start-up and imports count. Its bytecode is compiled first (into the tree's __pycache__), as
a pip install leaves it. `--python PY` runs fcsnap (and the `python -c pass` floor) with another
interpreter: a virtual environment holding only fcsnap's dependencies (`python -m venv V &&
V/bin/pip install .`) starts as a user's install does, without whatever the bench's own
interpreter loads at start (an editable install's finder, other packages' `.pth` files).
Runs are interleaved: each round runs every command once, so the machine's load hits all
alike; medians (and best and worst) are reported. Each output is deleted and synced away
before the next command. Cold: one run each after dropping the page cache
(needs root; off with --no-cold, as on a shared machine). With `--baseline DIR` (another
version of the code, e.g. `git archive <commit> | tar -x -C DIR`) every fcsnap command also
runs from DIR, in the same rounds.

With `--corpus DIR` (the output of bench/corpus.py: a real Linux guest's memory, generation by
generation) the same commands run on the corpus's gen0 and gen1 instead (written out as Full
files; the sparse Diff file holds the pages that changed), and a second table follows the whole
lineage: the corpus's own figures per generation next to what pack and diff stored for it, raw
and compressed (through the Python API). Results go to bench/results/pack-corpus.{md,json}.

    python bench/pack.py [--size 1G] [--workdir DIR] [--repeat 7] [--no-cold] [--keep]
                         [--baseline DIR] [--python V/bin/python]
    python bench/pack.py --corpus ~/.cache/fcsnap/corpus/256M-4-<key>
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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import zstandard
from machine import drop_caches, filesystem, machine

from fcsnap.store.operations import ops
from fcsnap.store.operations.builder import BuildOptions
from fcsnap.testing.memimage import (
    PAGE,
    evolve,
    synthetic_memory,
    write_full,
    write_sparse_diff,
)
from fcsnap.units import parse_size

HERE = Path(__file__).resolve().parent
TREE = HERE.parent
RESULTS = HERE / "results"
MB = 1e6
CP, PACK = "cp --sparse=always", "fcsnap pack (raw)"
ZSTD, PACK_ZSTD = "zstd -3 -T2", "fcsnap pack --compress zstd"
DIFF_FULL, DIFF_SPARSE = "fcsnap diff (Full file)", "fcsnap diff --sparse-diff"
BASELINE = " (baseline)"


@dataclass
class Row:
    name: str
    command: str
    input_bytes: int  # apparent size of the memory file the command reads
    warm_runs: list[float] = field(default_factory=list)
    cpu_runs: list[float] = field(default_factory=list)  # user + system seconds of the process
    cold_s: float | None = None
    output_bytes: int = 0  # allocated on disk

    @property
    def warm_s(self) -> float:
        return statistics.median(self.warm_runs)

    @property
    def cpu_s(self) -> float:
        return statistics.median(self.cpu_runs)

    def mbps(self, seconds: float) -> float:
        return self.input_bytes / MB / seconds


@dataclass
class Case:
    """One benchmarked command: `run` does the work and returns its output path."""

    row: Row
    run: Callable[[], Path]


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_usage(path: Path) -> int:
    """Bytes allocated on disk for a file or a directory's files (cp's output is sparse)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(f.stat().st_blocks * 512 for f in files)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)




def compile_bytecode(tree: Path, python: str) -> dict[str, str]:
    """The environment of a `python -m fcsnap` from `tree`, its bytecode compiled first into
    the tree's __pycache__ directories, as a pip install leaves it (PYTHONDONTWRITEBYTECODE,
    where set, would otherwise make every run compile every module it imports)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    env.pop("PYTHONPYCACHEPREFIX", None)  # bytecode is looked up only there when set
    subprocess.run([python, "-m", "compileall", "-q", str(tree / "fcsnap")],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    return env


def fcsnap(argv: list[str], tree: Path, env: dict[str, str], python: str
           ) -> Callable[[], Path]:
    """A whole `python -m fcsnap` process from `tree`; returns the new build's directory. It
    runs in `tree`: `-m` puts the working directory first on the module path."""
    def run() -> Path:
        out = subprocess.run([python, "-m", "fcsnap", *argv, "--json"], env=env,
                             cwd=tree, check=True, capture_output=True, text=True).stdout
        return Path(json.loads(out)["path"])

    return run


def tool(argv: list[str], out: Path) -> Callable[[], Path]:
    def run() -> Path:
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        fsync(out)
        return out

    return run


def tools() -> dict[str, object]:
    """This machine, and the versions of the tools compared."""
    zstd_cli = subprocess.run(["zstd", "--version"], capture_output=True, text=True).stdout
    cp_version = subprocess.run(["cp", "--version"], capture_output=True, text=True).stdout
    return {
        **machine(),
        "zstd_cli": zstd_cli.strip(),
        "coreutils": cp_version.splitlines()[0],
        "python_zstandard": f"{zstandard.__version__} (libzstd {zstandard.ZSTD_VERSION})",
    }




def make_inputs(work: Path, size: int) -> tuple[Path, Path, Path, float]:
    """gen0 (Full), gen1 Full and gen1 sparse Diff (1% of pages dirty); gen0's non-zero share."""
    gen0, gen1, gen1_sparse = work / "gen0.mem", work / "gen1.mem", work / "gen1.sparse.mem"
    mem = synthetic_memory(size, seed=0)
    share = float(mem.any(axis=1).mean())
    write_full(gen0, mem)
    new, dirty = evolve(mem, seed=1, dirty_share=0.01)
    del mem
    write_full(gen1, new)
    write_sparse_diff(gen1_sparse, new, dirty)
    for path in (gen0, gen1, gen1_sparse):
        fsync(path)
    return gen0, gen1, gen1_sparse, share


def corpus_pages(path: Path) -> np.ndarray:
    """A corpus image as a (pages, 4096) array (its zero pages are holes on disk)."""
    return np.fromfile(path, dtype=np.uint8).reshape(-1, PAGE)


def corpus_inputs(work: Path, corpus: Path) -> tuple[Path, Path, Path, float]:
    """Like make_inputs, from the corpus's gen0 and gen1: Full copies (every page written, as
    Firecracker writes them) and a sparse Diff file of the pages that changed."""
    gen0, gen1, gen1_sparse = work / "gen0.mem", work / "gen1.mem", work / "gen1.sparse.mem"
    old, new = corpus_pages(corpus / "gen0.mem"), corpus_pages(corpus / "gen1.mem")
    share = float(old.any(axis=1).mean())
    write_full(gen0, old)
    write_full(gen1, new)
    write_sparse_diff(gen1_sparse, new, np.flatnonzero((old != new).any(axis=1)))
    for path in (gen0, gen1, gen1_sparse):
        fsync(path)
    return gen0, gen1, gen1_sparse, share


def corpus_lineage(work: Path, corpus: Path) -> list[dict[str, object]]:
    """Pack the corpus's gen0 and diff each later generation over the one before, raw and
    zstd; per generation, the corpus's figures and what each build stored."""
    manifest = json.loads((corpus / "manifest.json").read_text())
    rows: list[dict[str, object]] = [dict(g) for g in manifest["generations"]]
    for compression in ("none", "zstd"):
        options = BuildOptions(compression=compression, level=3)
        store = work / f"lineage-{compression}"
        base: Path | None = None
        for row in rows:
            path = corpus / str(row["file"])
            t0 = time.perf_counter()
            if base is None:
                result, base = ops.pack(path, store, options)
            else:
                # corpus images are sparse copies of Full snapshots: holes are zeros
                result, base = ops.diff(path, base, store, options, holes_are_zeros=True)
            row[f"{compression}_s"] = round(time.perf_counter() - t0, 3)
            row[f"{compression}_stored_bytes"] = disk_usage(base)
            row[f"{compression}_stats"] = asdict(result.stats)
    return rows


def cases(work: Path, gen0: Path, gen1: Path, gen1_sparse: Path,
          baseline: Path | None, python: str) -> list[Case]:
    """Every timed command, in table order: the tools next to what fcsnap does in their
    stead, then (with a baseline) the baseline tree's fcsnap commands."""
    size = gen0.stat().st_size
    cp_out, zstd_out = work / "cp.out", work / "zstd.out"
    trees = [("", TREE)] + ([(BASELINE, baseline)] if baseline is not None else [])
    todo: list[Case] = []
    for suffix, tree in trees:
        label = "baseline" if suffix else "tree"
        env = compile_bytecode(tree, python)
        store = work / f"store-{label}"
        _, base = ops.pack(gen0, store, BuildOptions())  # the parent of both diffs
        pack = ["pack", str(gen0), "--store", str(store)]
        diff = ["diff", "--store", str(store), "--base", str(base)]
        if not suffix:
            todo.append(Case(Row(CP, f"cp --sparse=always {gen0.name} OUT", size),
                             tool(["cp", "--sparse=always", str(gen0), str(cp_out)], cp_out)))
        todo.append(Case(Row(PACK + suffix, f"fcsnap pack {gen0.name}", size),
                         fcsnap(pack, tree, env, python)))
        if not suffix:
            todo.append(Case(
                Row(ZSTD, f"zstd -3 -T2 -f {gen0.name} -o OUT", size),
                tool(["zstd", "-3", "-T2", "-q", "-f", str(gen0), "-o", str(zstd_out)], zstd_out),
            ))
        todo += [
            Case(Row(PACK_ZSTD + suffix, f"fcsnap pack --compress zstd {gen0.name}", size),
                 fcsnap([*pack, "--compress", "zstd"], tree, env, python)),
            Case(Row(DIFF_FULL + suffix, f"fcsnap diff {gen1.name} (base gen0)", size),
                 fcsnap([*diff, str(gen1)], tree, env, python)),
            Case(Row(DIFF_SPARSE + suffix, f"fcsnap diff --sparse-diff {gen1_sparse.name}",
                     size), fcsnap([*diff, "--sparse-diff", str(gen1_sparse)], tree, env, python)),
        ]
    return todo


def interpreter(python: str, code: str = "pass") -> float:
    """One `python -c pass`: the floor under every fcsnap row (with `import typer`, the floor
    under every command of a command line built on typer)."""
    t0 = time.perf_counter()
    subprocess.run([python, "-c", code], check=True)
    return time.perf_counter() - t0


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(case: Case) -> float:
    """One run's wall time; its CPU time (all its threads) goes to the row."""
    cpu = children_cpu()
    t0 = time.perf_counter()
    out = case.run()
    elapsed = time.perf_counter() - t0
    case.row.cpu_runs.append(children_cpu() - cpu)
    case.row.output_bytes = disk_usage(out)
    remove(out)
    # The next run must not pay for this one's deletion: on a filesystem mounted with
    # `discard`, freeing hundreds of MiB is a journal commit full of TRIMs.
    os.sync()
    return elapsed


def ratios(rows: dict[str, Row], suffix: str = "") -> list[dict[str, object]]:
    """The targets, from medians of the same interleaved run; `suffix` picks the tree."""
    def both(a: str, b: str) -> tuple[float, float | None]:
        cold_a, cold_b = rows[a].cold_s, rows[b].cold_s
        return rows[a].warm_s / rows[b].warm_s, cold_a / cold_b if cold_a and cold_b else None

    def cpu(a: str, b: str) -> float:
        return round(rows[a].cpu_s / rows[b].cpu_s, 3)

    pack, pack_zstd = PACK + suffix, PACK_ZSTD + suffix
    size = rows[pack_zstd].output_bytes / rows[ZSTD].output_bytes
    checks = [
        ("pack raw time / cp time", *both(pack, CP), cpu(pack, CP), "<= 1.5",
         lambda r: r <= 1.5),
        ("pack zstd time / zstd -3 -T2 time", *both(pack_zstd, ZSTD), cpu(pack_zstd, ZSTD),
         "<= 1", lambda r: r <= 1),
        ("pack zstd size / zstd -3 -T2 size", size, None, None, "<= 1.05", lambda r: r <= 1.05),
        ("full diff time / sparse diff time", *both(DIFF_FULL + suffix, DIFF_SPARSE + suffix),
         cpu(DIFF_FULL + suffix, DIFF_SPARSE + suffix), ">= 10", lambda r: r >= 10),
    ]
    return [
        {"ratio": name + suffix, "warm": round(warm, 3),
         "cold": None if cold is None else round(cold, 3), "cpu": cpu_ratio, "target": target,
         "met": ok(warm)}
        for name, warm, cold, cpu_ratio, target, ok in checks
    ]


def markdown(info: dict[str, object], rows: list[Row], checks: list[dict[str, object]]) -> str:
    m = info["machine"]
    lines = [
        "# fcsnap pack/diff throughput" + (" on the real-guest corpus" if info["corpus"] else ""),
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}; {m['zstd_cli']}; {m['coreutils']}; python-zstandard "
        f"{m['python_zstandard']}.",
        "",
        f"{info['image']}; diffs are raw, over a raw pack of gen0. Files in {info['workdir']} "
        f"on {info['filesystem']}.",
        "",
        f"Whole processes, exec to exit. Warm: each command once, then {info['repeat']} rounds, "
        "each running every command once (interleaved); median, best and worst shown. Cold: one "
        "run after `sync; echo 3 > /proc/sys/vm/drop_caches`. Every time includes the fsync of "
        "the output. CPU = user + system seconds of the process (all its threads; not the "
        "fsync the bench adds after a tool). fcsnap is `python -m fcsnap ... --json` with its "
        f"bytecode compiled, run by {info['python']}, "
        "interpreter start-up and imports included"
        + (f" (the interpreter alone, `python -c pass`: {info['interpreter_s'] * 1000:.0f} ms "
           f"median; `python -c 'import typer'`: {info['typer_s'] * 1000:.0f} ms)"
           if info.get("interpreter_s") else "")
        + f". Load average {info['load']}. MB/s = 10^6 bytes of memory file (apparent size) "
        "per second, at the median. Output = blocks allocated on disk; for fcsnap the whole "
        "build (diff, header, hashes, build.json).",
        "",
        "| Command | Warm s (median) | Warm MB/s | Warm s (best) | Warm s (worst) "
        "| CPU s (median) | Cold s | Cold MB/s | Output MiB | Output / input |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cold = f"{r.cold_s:.3f} | {r.mbps(r.cold_s):.0f}" if r.cold_s else "- | -"
        lines.append(
            f"| {r.name} | {r.warm_s:.3f} | {r.mbps(r.warm_s):.0f} | {min(r.warm_runs):.3f} | "
            f"{max(r.warm_runs):.3f} | {r.cpu_s:.3f} | {cold} | "
            f"{r.output_bytes / (1 << 20):.1f} | {r.output_bytes / r.input_bytes:.3f} |"
        )
    lines += ["", "| Ratio (of medians) | Warm | Cold | CPU | Target | Met (warm) |",
              "|---|---:|---:|---:|---|---|"]
    for c in checks:
        cold = "-" if c["cold"] is None else f"{c['cold']:.3f}"
        cpu = "-" if c["cpu"] is None else f"{c['cpu']:.3f}"
        met = "yes" if c["met"] else "NO"
        lines.append(
            f"| {c['ratio']} | {c['warm']:.3f} | {cold} | {cpu} | {c['target']} | {met} |"
        )
    if info.get("lineage"):
        lines += ["", *lineage_markdown(info["lineage"])]
    return "\n".join(lines) + "\n"


def lineage_markdown(rows: list[dict[str, object]]) -> list[str]:
    """The corpus lineage table: its figures per generation, and what each build stored."""
    def share(value: object) -> str:
        return "-" if value is None else f"{value:.1%}"

    lines = [
        "The whole corpus lineage: gen0 packed, each later generation diffed (Full file) over "
        "the one before. Zero/duplicate/changed shares and the zstd ratio of the non-zero pages "
        "are the corpus's own figures (bench/corpus.py); stored = the build on disk.",
        "",
        "| Generation | Zero pages | Duplicate pages | Changed pages | zstd ratio (non-zero) "
        "| Raw stored MiB | Raw s | zstd stored MiB | zstd s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['file']} | {share(r['zero_share'])} | {share(r['duplicate_share'])} | "
            f"{share(r['changed_share'])} | {r['zstd_ratio_nonzero']:.2f} | "
            f"{int(r['none_stored_bytes']) / (1 << 20):.1f} | {r['none_s']:.3f} | "
            f"{int(r['zstd_stored_bytes']) / (1 << 20):.1f} | {r['zstd_s']:.3f} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1G", help="memory file size (default 1G)")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                        help="where to put the files: a real disk, not tmpfs (default /var/tmp)")
    parser.add_argument("--repeat", type=int, default=7,
                        help="interleaved rounds of warm runs (median of)")
    parser.add_argument("--no-cold", action="store_true", help="skip the dropped-cache runs")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--corpus", type=Path, metavar="DIR",
                        help="run on a bench/corpus.py lineage instead of synthetic memory")
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="also run every fcsnap command from this tree, in the same rounds")
    parser.add_argument("--python", default=sys.executable, metavar="PY",
                        help="the interpreter that runs fcsnap, e.g. a virtual environment's "
                             "holding only fcsnap's dependencies (default: this one)")
    args = parser.parse_args()
    size = parse_size(args.size)
    if args.corpus is not None and not (args.corpus / "manifest.json").is_file():
        parser.error(f"{args.corpus}: not a corpus directory (no manifest.json)")
    if args.baseline is not None and not (args.baseline / "fcsnap" / "__main__.py").is_file():
        parser.error(f"{args.baseline}: not a tree of fcsnap (no fcsnap/__main__.py)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fcsnap-bench-", dir=args.workdir)).resolve()
    try:
        if args.corpus is None:
            print(f"writing a {args.size} image and its next generation in {work}",
                  file=sys.stderr)
            gen0, gen1, gen1_sparse, data_share = make_inputs(work, size)
            image = (f"Image: {size / (1 << 30):g} GiB synthetic_memory (seed 0), "
                     f"{data_share:.1%} of its pages non-zero; gen1 = evolve(seed 1, 1% of "
                     "pages dirty) as a Full file and as a sparse Diff file")
        else:
            gen0, gen1, gen1_sparse, data_share = corpus_inputs(work, args.corpus)
            size = gen0.stat().st_size
            image = (f"Image: the real-guest corpus {args.corpus.name} ({size >> 20} MiB QEMU "
                     f"guest, bench/corpus.py), {data_share:.1%} of gen0's pages non-zero; gen1 "
                     "= the corpus's next generation as a Full file and as a sparse Diff file "
                     "of its changed pages (the >= 10 diff target is for 1% dirty pages; this "
                     "generation changed more)")
        todo = cases(work, gen0, gen1, gen1_sparse, args.baseline, args.python)
        load = [os.getloadavg()]
        for case in todo:
            measure(case)  # warm the caches (and the page cache with the inputs)
        floor, typer_floor = [], []
        for n in range(args.repeat):
            print(f"warm: round {n + 1} of {args.repeat}", file=sys.stderr)
            floor.append(interpreter(args.python))
            typer_floor.append(interpreter(args.python, "import typer"))
            for case in todo:
                case.row.warm_runs.append(measure(case))
        load.append(os.getloadavg())
        if not args.no_cold and os.geteuid() == 0:
            for case in todo:
                print(f"cold: {case.row.name}", file=sys.stderr)
                drop_caches()
                case.row.cold_s = measure(case)
        rows = [c.row for c in todo]
        info = {
            "machine": tools(),
            "size": size,
            "data_share": data_share,
            "image": image,
            "corpus": None if args.corpus is None else str(args.corpus),
            "workdir": str(work),
            "filesystem": filesystem(work),
            "repeat": args.repeat,
            "interpreter_s": statistics.median(floor),
            "typer_s": statistics.median(typer_floor),
            "python": args.python,
            "load": " to ".join(" ".join(f"{x:.1f}" for x in avg) for avg in load),
            "baseline": None if args.baseline is None else str(args.baseline),
        }
        if args.corpus is not None:
            print("corpus lineage", file=sys.stderr)
            info["lineage"] = corpus_lineage(work, args.corpus)
        by_name = {r.name: r for r in rows}
        checks = ratios(by_name)
        if args.baseline is not None:
            checks += ratios(by_name, BASELINE)
        text = markdown(info, rows, checks)
        RESULTS.mkdir(exist_ok=True)
        name = "pack" if args.corpus is None else "pack-corpus"
        (RESULTS / f"{name}.md").write_text(text)
        results = [
            {**asdict(r), "warm_s": r.warm_s, "warm_mbps": r.mbps(r.warm_s),
             "cold_mbps": r.mbps(r.cold_s) if r.cold_s else None}
            for r in rows
        ]
        (RESULTS / f"{name}.json").write_text(
            json.dumps({**info, "results": results, "ratios": checks}, indent=2) + "\n"
        )
        print(text)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
