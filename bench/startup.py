"""Start-up: whole-process times of `fcsnap --help`, `fcsnap inspect` and `fcsnap restore`
(exec to a listening socket), for this tree and a baseline tree, interleaved in one run.

Each command runs as a fresh `python -m fcsnap` process with PYTHONPATH pointing at one tree,
so both trees pay the same interpreter start-up, with bytecode cached as an installed package
has it (a first, untimed run of each command writes it); runs of the two trees alternate, so
the machine's load hits both alike. restore is timed from just before the exec until its socket
exists (it binds and listens in one step; polled every 0.2 ms), then stopped with SIGTERM. A
second table times the floor of each way to build the command line: one command with a flag,
rendering its --help, in typer, click and argparse. With a baseline, the ratio column is this
tree's median over the baseline's.

    python bench/startup.py [--baseline DIR] [--runs 21]

DIR holds another version of the code, e.g. `git archive <commit> | tar -x -C DIR`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from machine import machine

HERE = Path(__file__).resolve().parent
TREE = HERE.parent
RESULTS = HERE / "results"
PYCACHE = tempfile.mkdtemp(prefix="fcsnap-startup-pycache-")
LISTEN_DEADLINE = 10.0  # seconds a restore may take to listen before the run fails
TARGET_MS = 250.0

FRAMEWORKS = {
    "typer": """
import typer
app = typer.Typer(add_completion=False)
@app.command()
def pack(memfile: str, json_out: bool = typer.Option(False, "--json", help="JSON.")) -> None:
    pass
@app.command()
def verify(build: str) -> None:
    pass
app()
""",
    "click": """
import click
@click.group()
def cli() -> None:
    pass
@cli.command()
@click.argument("memfile")
@click.option("--json", "json_out", is_flag=True, help="JSON.")
def pack(memfile: str, json_out: bool) -> None:
    pass
cli()
""",
    "argparse": """
import argparse
parser = argparse.ArgumentParser(prog="fcsnap")
sub = parser.add_subparsers(dest="command")
pack = sub.add_parser("pack")
pack.add_argument("memfile")
pack.add_argument("--json", action="store_true", help="JSON.")
parser.parse_args()
""",
}


def env_for(tree: Path) -> dict[str, str]:
    """Bytecode cached in a directory of this run's (as in an installed package, whose
    bytecode pip compiles), whatever PYTHONDONTWRITEBYTECODE says: compiling fcsnap's sources
    at every start would be most of what is timed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PYTHONPATH": str(tree), "COLUMNS": "100", "PYTHONPYCACHEPREFIX": PYCACHE}


Sample = tuple[float, float | None]  # seconds: from exec to exit (or listening), CPU used


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(argv: list[str], env: dict[str, str], status: int = 0) -> Sample:
    """Seconds from exec to exit, and the CPU seconds the process used (what a loaded
    machine blurs least); the command must exit `status`. Run in /, since `python -m`
    imports from the working directory before PYTHONPATH."""
    cpu = children_cpu()
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          timeout=60, cwd="/")
    elapsed = time.perf_counter() - started
    if done.returncode != status:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}, not {status}: "
                         f"{done.stderr.decode().strip()}")
    return elapsed, children_cpu() - cpu


def usage_once(tree: Path) -> Sample:
    """A command line refused before any work (exit 2)."""
    argv = [sys.executable, "-m", "fcsnap", "pack", "mem", "--store", "S", "--compress", "gz"]
    return run_once(argv, env_for(tree), status=2)


def listen_once(tree: Path, store: Path, work: Path) -> Sample:
    """Seconds from exec of `fcsnap restore` to its socket existing (its CPU time is not
    known then)."""
    sock = work / f"uffd-{time.monotonic_ns()}.sock"
    argv = [sys.executable, "-m", "fcsnap", "restore", "--vm", "vm", "--store", str(store),
            "--socket", str(sock), "--quiet"]
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env_for(tree), stderr=subprocess.PIPE, cwd="/")
    try:
        while not sock.exists():
            if proc.poll() is not None or time.perf_counter() - started > LISTEN_DEADLINE:
                raise SystemExit(f"restore never listened: {proc.stderr.read().decode()}")
            time.sleep(0.0002)
        elapsed = time.perf_counter() - started
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    return elapsed, None


def make_store(work: Path) -> Path:
    """A two-generation store (8 MiB of synthetic guest memory) for inspect and restore."""
    script = """
import sys
from pathlib import Path
from fcsnap.store.operations import ops
from fcsnap.store.operations.builder import BuildOptions
from fcsnap.testing.memimage import evolve, synthetic_memory, write_full
work = Path(sys.argv[1])
mem = synthetic_memory(8 << 20, seed=1)
write_full(work / "m0", mem)
write_full(work / "m1", evolve(mem, seed=2, dirty_share=0.1)[0])
_, b0 = ops.pack(work / "m0", work / "store", BuildOptions(name="vm"))
ops.diff(work / "m1", b0, work / "store", BuildOptions(name="vm"))
"""
    subprocess.run([sys.executable, "-c", script, str(work)], env=env_for(TREE), check=True,
                   timeout=120, cwd="/")
    return work / "store"


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 1)


def summary(samples: list[Sample]) -> dict[str, float | None]:
    """Median and best, in ms: on a machine others load, the best run is the one least
    disturbed, the median what a caller sees; and the median CPU time."""
    walls = [wall for wall, _ in samples]
    cpus = [cpu for _, cpu in samples if cpu is not None]
    return {"median": median_ms(walls), "best": round(min(walls) * 1000, 1),
            "cpu_median": median_ms(cpus) if cpus else None}


def measure(
    trees: dict[str, Path], runs: int, work: Path
) -> dict[str, dict[str, dict[str, float | None]]]:
    """Median and best milliseconds per (command, tree); the trees' runs interleaved."""
    store = make_store(work)
    python = [sys.executable, "-m", "fcsnap"]
    commands: dict[str, Callable[[Path], Sample]] = {
        "fcsnap --help": lambda tree: run_once([*python, "--help"], env_for(tree)),
        "fcsnap restore --help": lambda tree: run_once([*python, "restore", "--help"],
                                                       env_for(tree)),
        "fcsnap pack (usage error: exit 2)": lambda tree: usage_once(tree),
        "fcsnap inspect vm --store S": lambda tree: run_once(
            [*python, "inspect", "vm", "--store", str(store)], env_for(tree)),
        "fcsnap restore: exec to listening": lambda tree: listen_once(tree, store, work),
    }
    samples: dict[tuple[str, str], list[Sample]] = {(c, t): [] for c in commands for t in trees}
    for timed in commands.values():  # a first run of each writes its bytecode
        for tree in trees.values():
            timed(tree)
    for _ in range(runs):
        for command, timed in commands.items():
            for name, tree in trees.items():
                samples[command, name].append(timed(tree))
    floor = [sys.executable, "-c", "pass"]
    baseline = [run_once(floor, env_for(TREE)) for _ in range(runs)]
    result = {c: {t: summary(samples[c, t]) for t in trees} for c in commands}
    result["python -c pass (interpreter alone)"] = {t: summary(baseline) for t in trees}
    return result


def frameworks(runs: int) -> dict[str, float]:
    """Median milliseconds of a minimal command line's --help in each framework installed
    (typer and click are no dependencies of fcsnap: `pip install typer` to compare)."""
    out = {}
    for name, script in FRAMEWORKS.items():
        if importlib.util.find_spec(name) is None:
            continue
        argv = [sys.executable, "-c", script, "pack", "--help"]
        out[name] = median_ms([run_once(argv, env_for(TREE))[0] for _ in range(runs)])
    return out


def markdown(result: dict[str, dict[str, dict[str, float | None]]], floors: dict[str, float],
             meta: dict) -> str:
    names = list(next(iter(result.values())))
    kinds = {"median": "median", "best": "best", "cpu_median": "CPU median"}
    heads = [f"{n} {kinds[k]} ms" for n in names for k in kinds]
    lines = [
        f"Machine: {meta['machine']['cpu']} ({meta['machine']['cores']} cores), Python "
        f"{meta['machine']['python']}, load average {meta['load']}; {meta['runs']} runs each, "
        "trees interleaved.",
        "",
        f"| Command | {' | '.join(heads)} | Ratio (median) | Target | Met (median) |",
        f"|---|{'---:|' * len(heads)}---:|---|---|",
    ]
    for command, per_tree in result.items():
        ours = per_tree[names[0]]["median"]
        target, met = ("-", "-") if command.startswith("python") else (
            f"<= {TARGET_MS:.0f} ms", "yes" if ours <= TARGET_MS else "no")
        cells = " | ".join("-" if per_tree[n][k] is None else f"{per_tree[n][k]:.1f}"
                           for n in names for k in kinds)
        ratio = f"{ours / per_tree[names[-1]]['median']:.2f}" if len(names) > 1 else "-"
        lines.append(f"| {command} | {cells} | {ratio} | {target} | {met} |")
    lines += ["", "| Minimal CLI, `pack --help` | median ms |", "|---|---:|"]
    lines += [f"| {name} | {ms:.1f} |" for name, ms in floors.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path,
                        help="A tree with the code to compare against (before).")
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    trees = {"this tree": TREE}
    if args.baseline is not None:
        if not (args.baseline / "fcsnap").is_dir():
            raise SystemExit(f"{args.baseline} holds no fcsnap package")
        trees["baseline"] = args.baseline.resolve()
    try:
        with tempfile.TemporaryDirectory(prefix="fcsnap-startup-") as tmp:
            result = measure(trees, args.runs, Path(tmp))
        floors = frameworks(args.runs)
    finally:
        shutil.rmtree(PYCACHE, ignore_errors=True)
    meta = {
        "machine": machine(), "runs": args.runs, "trees": {k: str(v) for k, v in trees.items()},
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "startup.json").write_text(
        json.dumps({**meta, "ms": result, "frameworks_median_ms": floors}, indent=2) + "\n")
    text = markdown(result, floors, meta)
    (RESULTS / "startup.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
