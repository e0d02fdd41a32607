"""`fcsnap export` and `fcsnap import` throughput against the copy floor, side by side.

A lineage of four generations is stored in an fcsnap store (pack, then three diffs), from the
real-guest corpus (`--corpus DIR`, the output of bench/corpus.py) or from synthetic memory
(fcsnap.testing.memimage, 1% of pages dirty a generation). Then, in interleaved rounds (every
command once a round, so the machine's load hits all alike), each timed as a whole process
from exec to exit with every file it writes fsynced:

- `python3 -c pass`: the interpreter's start, under every fcsnap row;
- `cp -r` of the fcsnap store's build directories, then an fsync of every file copied: the
  floor under an export, which reads those bytes and writes as many;
- `fcsnap export` of the lineage: uncompressed, zstd frames, LZ4 frames (2 MiB frames);
- `cp -r` of the uncompressed export, fsynced: the floor under an import;
- `fcsnap import` of each export (uncompressed, zstd, LZ4) into an empty store.

Medians (and best and worst) of wall and CPU time; results in
bench/results/e2b-transfer[-corpus].{md,json}. `--baseline DIR` (another version of the code,
e.g. `git archive <commit> | tar -x -C DIR`) runs its export and import too, in the same rounds.

    python bench/e2b_transfer.py [--corpus ~/.cache/fcsnap/corpus/256M-4-<key>] [--size 256M]
                                 [--repeat 5] [--workdir DIR] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from machine import filesystem, machine
from pack import children_cpu, compile_bytecode, disk_usage, fsync, remove

from fcsnap.testing.memimage import evolve, synthetic_memory, write_full
from fcsnap.units import parse_size

HERE = Path(__file__).resolve().parent
TREE = HERE.parent
RESULTS = HERE / "results"
MIB = 1 << 20
GENERATIONS = 4


@dataclass
class Row:
    name: str
    data_bytes: int  # the uncompressed diff bytes the command moves
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    output_bytes: int = 0

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "data_bytes": self.data_bytes, "wall_s": self.wall,
                "cpu_s": self.cpu, "median_wall_s": statistics.median(self.wall),
                "median_cpu_s": statistics.median(self.cpu), "output_bytes": self.output_bytes}


def run(argv: list[str], env: dict[str, str]) -> str:
    """A process of the tree `env` names, run in that tree: `-m` puts the working directory
    first on the module path."""
    return subprocess.run(argv, env=env, cwd=env["PYTHONPATH"], check=True,
                          capture_output=True, text=True).stdout


def fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        fsync(p)  # directories too: a new name is durable once its directory is synced
    fsync(path)


def make_store(work: Path, corpus: Path | None, size: int, env: dict[str, str]) -> Path:
    """The lineage as an fcsnap store (raw diffs), its head named vm."""
    store = work / "store"
    fcsnap = [sys.executable, "-m", "fcsnap"]
    if corpus is not None:
        images = [corpus / f"gen{g}.mem" for g in range(GENERATIONS)]
    else:
        mem = synthetic_memory(size, seed=0)
        images = []
        for g in range(GENERATIONS):
            images.append(work / f"gen{g}.mem")
            write_full(images[-1], mem)
            mem, _ = evolve(mem, seed=g + 1, dirty_share=0.01)
    run([*fcsnap, "pack", "--init", str(images[0]), "--store", str(store), "--name", "vm", "-q"],
        env)
    for image in images[1:]:
        run([*fcsnap, "diff", str(image), "--base", "vm", "--store", str(store), "--name", "vm",
             "--holes-are-zeros", "-q"], env)
    if corpus is None:
        for image in images:
            image.unlink()
    return store


def head_of(store: Path) -> str:
    """The newest build of an exported store (the highest generation)."""
    from fcsnap.header import load_header

    return max((p for p in store.iterdir() if p.is_dir()),
               key=lambda p: load_header(p / "memfile.header").metadata.generation).name


Case = tuple[Row, Callable[[Path], None]]


def cases(work: Path, store: Path, sources: dict[str, Path], trees: dict[str, dict[str, str]],
          data: int) -> list[Case]:
    """Every command of a round; each writes to the path it is given."""
    builds = [p for p in store.iterdir() if p.name != "vms"]

    def cp(paths: list[Path]) -> Callable[[Path], None]:
        def go(out: Path) -> None:
            out.mkdir()
            subprocess.run(["cp", "-r", *map(str, paths), str(out)], check=True)
            fsync_tree(out)
        return go

    def fcsnap(argv: list[str], env: dict[str, str]) -> Callable[[Path], None]:
        def go(out: Path) -> None:
            run([sys.executable, "-m", "fcsnap", *[str(a).replace("OUT", str(out))
                                                    for a in argv], "-q"], env)
        return go

    def interpreter(out: Path) -> None:
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        out.mkdir()

    todo: list[Case] = [(Row("python3 -c pass (the interpreter alone)", 0), interpreter),
                        (Row("cp -r of the fcsnap builds + fsync", data), cp(builds))]
    for tree, env in trees.items():
        for codec in ("none", "zstd", "lz4"):
            if codec == "lz4" and tree:
                continue  # a baseline may predate LZ4 export
            todo.append((Row(f"fcsnap export --compress {codec}{tree}", data),
                         fcsnap(["export", "vm", "--store", store, "-o", "OUT", "--compress",
                                 codec], env)))
    source = sources["none"]
    todo.append((Row("cp -r of the E2B store + fsync", data),
                 cp([p for p in source.iterdir()])))
    for tree, env in trees.items():
        init = [] if tree else ["--init"]  # a baseline may predate `init`: it made the store
        for codec, src in sources.items():
            todo.append((Row(f"fcsnap import of a {codec} E2B store{tree}", data),
                         fcsnap(["import", *init, src / head_of(src), "--store", "OUT"], env)))
    return todo


def measure(case: Case, out: Path) -> None:
    row, go = case
    cpu = children_cpu()
    t0 = time.perf_counter()
    go(out)
    row.wall.append(time.perf_counter() - t0)
    row.cpu.append(children_cpu() - cpu)
    row.output_bytes = disk_usage(out)
    remove(out)
    subprocess.run(["sync", "-f", str(out.parent)], check=True)


def markdown(info: dict[str, object], rows: list[Row]) -> str:
    m = info["machine"]
    lines = [
        "# E2B export and import against the copy floor"
        + (" on the real-guest corpus" if info["corpus"] else ""),
        "",
        f"{info['lineage']}; {info['data_bytes'] / MIB:.0f} MiB of diffs in the lineage "
        f"(the bytes moved). {m['cpu']}, {m['cores']} cores, {info['filesystem']}; medians of "
        f"{info['repeat']} interleaved rounds, each command a whole process with its output "
        "fsynced.",
        "",
        "| Command | Wall (median) | Best / worst | CPU (median) | MB/s | Output |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        wall = statistics.median(r.wall)
        lines.append(
            f"| {r.name} | {wall:.2f} s | {min(r.wall):.2f} / {max(r.wall):.2f} s | "
            f"{statistics.median(r.cpu):.2f} s | "
            f"{f'{r.data_bytes / 1e6 / wall:.0f}' if r.data_bytes else '-'} | "
            f"{r.output_bytes / MIB:.1f} MiB |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path)
    parser.add_argument("--size", default="256M")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--baseline", type=Path)
    args = parser.parse_args()
    trees = {"": compile_bytecode(TREE)}
    if args.baseline:
        trees[" (baseline)"] = compile_bytecode(args.baseline.resolve())
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        store = make_store(work, args.corpus, parse_size(args.size, "size"), trees[""])
        data = sum((p / "memfile.diff").stat().st_size for p in store.iterdir()
                   if (p / "memfile.diff").exists())
        sources = {}
        for codec in ("none", "zstd", "lz4"):
            sources[codec] = work / f"e2b-{codec}"
            run([sys.executable, "-m", "fcsnap", "export", "vm", "--store", str(store), "-o",
                 str(sources[codec]), "--compress", codec, "-q"], trees[""])
        todo = cases(work, store, sources, trees, data)
        for _ in range(args.repeat):
            for case in todo:
                measure(case, work / "out")
        rows = [row for row, _ in todo]
        info = {
            "machine": machine(), "filesystem": filesystem(work), "repeat": args.repeat,
            "corpus": str(args.corpus) if args.corpus else None, "data_bytes": data,
            "lineage": (f"the corpus's {GENERATIONS} generations" if args.corpus else
                        f"{GENERATIONS} generations of {args.size} synthetic memory"),
        }
    name = "e2b-transfer" + ("-corpus" if args.corpus else "")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(
        {**info, "rows": [r.to_json() for r in rows]}, indent=1) + "\n")
    text = markdown(info, rows)
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
