"""The real Firecracker in the loop: boot fcguest, snapshot it, load the snapshot into a new
Firecracker with its memory served by fcsnap (`fcsnap restore`, `restore --firecracker-api`,
`restore --daemon`, the Python API) or by Firecracker's own File backend, and check that the
guest goes on: its round counter (in guest RAM) continues from where it was, and every page it
checks holds what it should.

A test, in outline (tests/test_real_vmm.py has the real ones):

    snap = take_snapshot(tmp / "template", GuestConfig(fill=2048), rounds=2)
    fcsnap pack snap.mem --vmstate snap.vmstate --store S --name vm
    with RestoreProcess(tmp / "uffd.sock", "--vm", "vm", "--store", S) as server, \\
            Firecracker(tmp, "clone") as vm:
        vm.load(snap.vmstate, uffd=server.socket)
        vm.expect_progress(snap.last_round)        # raises GuestError if it did not go on

Every wait has a deadline (WAIT unless given) and raises VmmError (Firecracker or fcsnap
misbehaved, with Firecracker's log or fcsnap's stderr) or GuestError (an AssertionError: the
guest printed BAD, or its counter did not go on). Every process is a context manager that
kills it at exit. Firecracker's stdout is the guest's serial console; its log goes to a file
(`Firecracker.log`), so that log lines never split a console line. The binary comes from
fcsnap.testing.fcbinary, the guest from fcsnap.testing.fcguest (both cached); either raises
fcbinary.Unavailable when this machine cannot have it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from fcsnap.testing import fcguest
from fcsnap.testing.fcbinary import firecracker_binary, jailer_binary
from fcsnap.testing.fcguest import GuestConfig, Round, parse_round
from fcsnap.uffd.firecracker_api import Response
from fcsnap.unix_http import AnswerError, UnixHTTPConnection, exchange

if TYPE_CHECKING:
    from fcsnap.api import Served

WAIT = 30.0  # seconds any one step may take (a boot, a load, a few rounds, a process exit)
LOG_TAIL = 5  # lines of Firecracker's log or fcsnap's stderr quoted in an error
POLL = 0.1  # seconds between looks at whether a process whose output is awaited still runs
EXIT_GRACE = 0.5  # seconds to read what a process wrote before it exited
MAX_SOCKET_PATH = 107  # bytes in a Unix socket's address (sun_path less its NUL)
SETTLE = 0.2  # seconds for the console's reader to take what a just-paused guest printed


class VmmError(Exception):
    """Firecracker or an fcsnap process failed a step, or missed its deadline."""


class GuestError(AssertionError):
    """The guest did not go on right: a BAD round, a counter that jumped or went back."""


class _Lines:
    """Lines a process writes to one pipe, read by a thread as they come; waiters get them
    with a deadline. A last line without its newline (a VM killed mid-line) is left out."""

    def __init__(self, pipe: IO[bytes], name: str) -> None:
        self.lines: list[str] = []
        self.ended = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(pipe,), name=name, daemon=True)
        self._thread.start()

    def _read(self, pipe: IO[bytes]) -> None:
        for raw in iter(pipe.readline, b""):
            if not raw.endswith(b"\n"):
                break  # the end of the pipe, mid-line
            with self._cond:
                self._take(raw.decode(errors="replace").rstrip("\r\n"), time.monotonic())
                self._cond.notify_all()
        with self._cond:
            self.ended = True
            self._cond.notify_all()

    def _take(self, line: str, _read_at: float) -> None:
        self.lines.append(line)

    def wait(self, done: Callable[[], bool], timeout: float,
             proc: subprocess.Popen[bytes] | None = None) -> bool:
        """Wait until done() (True), or the pipe ended, `proc` exited (its children may hold
        the pipe open) or the deadline passed (False). done() runs under the lock that the
        reader takes lines under."""
        deadline = time.monotonic() + timeout
        exited_at = None
        with self._cond:
            while not done():
                now = time.monotonic()
                if exited_at is None and proc is not None and proc.poll() is not None:
                    exited_at = now  # lines it wrote may still be in the pipe: a moment more
                gone = exited_at is not None and now - exited_at > EXIT_GRACE
                if self.ended or gone or now >= deadline:
                    return False
                self._cond.wait(min(deadline - now, POLL))
            return True

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class _Console(_Lines):
    """Firecracker's stdout, the guest's serial console: progress lines are parsed as they
    come, with the time each was read (a guest under hardware KVM prints thousands a second,
    so they are counted, not searched); other lines are kept as lines."""

    def __init__(self, pipe: IO[bytes], name: str) -> None:
        self.rounds: list[tuple[float, Round]] = []
        self.error: str | None = None  # the guest's `fcguest error ...` line, if it halted
        super().__init__(pipe, name)

    def _take(self, line: str, read_at: float) -> None:
        if (progress := parse_round(line)) is not None:
            self.rounds.append((read_at, progress))
            return
        if line.startswith("fcguest error") and self.error is None:
            self.error = line
        self.lines.append(line)


def _request(socket_path: Path, method: str, path: str, body: dict[str, Any] | None,
             timeout: float) -> Response:
    connection = UnixHTTPConnection(socket_path, timeout)
    try:
        data = b"" if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        answer, payload = exchange(connection, method, path, data, headers, 1 << 20)
        return Response(answer.status, answer.reason, payload)
    except (OSError, AnswerError) as e:
        raise VmmError(f"{method} {path} on {socket_path}: {e}") from None
    finally:
        connection.close()


@dataclass(frozen=True)
class Snapshot:
    """A paused guest's snapshot: Firecracker's vmstate and memory files, and what a load of
    it must see: the guest's last whole round before the pause, and how it was booted."""

    vmstate: Path
    mem: Path
    kind: str  # "Full" or "Diff"
    last_round: int
    config: GuestConfig
    mem_mib: int
    huge_pages: str | None


@dataclass(frozen=True)
class Jail:
    """Run Firecracker under its jailer, as production does: chrooted, as uid:gid (nobody by
    default). Needs root."""

    uid: int = 65534
    gid: int = 65534


class Firecracker:
    """One Firecracker process, its API socket and log in `workdir` (named after `name`).
    `with Firecracker(...) as vm:` starts it and waits for its API; exit kills it.

    With `jail`, the jailer runs it chrooted at `root` (workdir/jail/firecracker/NAME/root) as
    the jail's uid: paths it is given are mapped into the chroot (`vmm_path`: a file outside
    it is hard-linked or copied in), and a page server's socket must be made inside `root`,
    owned by that uid (`fcsnap restore --socket-owner`)."""

    def __init__(self, workdir: Path, name: str = "fc", *, binary: Path | None = None,
                 jail: Jail | None = None, extra_args: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.name = name
        self.jail = jail
        self.binary = binary or firecracker_binary()
        # the jailer's layout: <chroot base>/<exec file's name>/<id>/root
        self.root = workdir / "jail" / self.binary.name / name / "root" if jail else None
        self.api_socket = (self.root or workdir) / (f"{name}.api" if not jail else "api.sock")
        self.log = (self.root or workdir) / (f"{name}.log" if not jail else "fc.log")
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.console: _Console | None = None
        self.version = ""
        self.load_started: float | None = None  # time.monotonic() as the last load was sent

    def __enter__(self) -> Firecracker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, timeout: float = WAIT) -> Firecracker:
        """Start the process and wait until its API answers (GET /version: `version`); if it
        does not, kill it and raise VmmError."""
        try:
            return self._start(timeout)
        except BaseException:
            self.close()
            raise

    def _start(self, timeout: float) -> Firecracker:
        if len(os.fsencode(self.api_socket.absolute())) > MAX_SOCKET_PATH:
            raise VmmError(f"{self.api_socket}: too long for a Unix socket's address")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.api_socket.unlink(missing_ok=True)
        self.log.write_bytes(b"")  # Firecracker opens its --log-path, it does not create it
        argv = ["--api-sock", self.vmm_path(self.api_socket), "--log-path",
                self.vmm_path(self.log), "--level", "Warning", *self.extra_args]
        if self.jail is not None:
            os.chown(self.log, self.jail.uid, self.jail.gid)
            argv = [str(jailer_binary()), "--id", self.name, "--exec-file", str(self.binary),
                    "--uid", str(self.jail.uid), "--gid", str(self.jail.gid),
                    "--chroot-base-dir", str(self.workdir / "jail"), "--", *argv]
        else:
            argv = [str(self.binary), *argv]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        assert self.proc.stdout is not None
        self.console = _Console(self.proc.stdout, f"{self.name}-console")
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise VmmError(f"Firecracker {self.name} exited ({self.proc.returncode}) "
                               f"before its API listened{self._tail()}")
            if self.api_socket.exists():
                try:
                    answer = _request(self.api_socket, "GET", "/version", None, timeout)
                    self.version = json.loads(answer.body).get("firecracker_version", "")
                    return self
                except VmmError:
                    pass  # bound, not yet listening
            if time.monotonic() > deadline:
                raise VmmError(f"Firecracker {self.name}'s API did not listen within "
                               f"{timeout:g}s{self._tail()}")
            time.sleep(0.01)

    def close(self) -> None:
        """Kill the process (if it runs) and collect its console to the end."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT)
        if self.console is not None:
            self.console.join(WAIT)

    kill = close

    def vmm_path(self, path: Path) -> str:
        """`path` as Firecracker must be given it: absolute; in a jail, inside the chroot (a
        file from outside is hard-linked, or copied, in under its name, owned by the jail's
        uid)."""
        if self.root is None or self.jail is None:
            return str(path.absolute())
        path = path.absolute()
        if not path.is_relative_to(self.root):
            inside = self.root / path.name
            if not inside.exists():
                try:
                    os.link(path, inside)
                except OSError:
                    shutil.copyfile(path, inside)
                os.chown(inside, self.jail.uid, self.jail.gid)
            path = inside
        return "/" + str(path.relative_to(self.root))

    def _tail(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()[-LOG_TAIL:]
        except OSError:
            lines = []
        if self.console is not None:
            lines += [line for line in self.console.lines[-LOG_TAIL:] if line.strip()]
        return (" | " + " | ".join(" ".join(line.split())[:300] for line in lines)) if lines \
            else ""

    # -- the API -------------------------------------------------------------------------

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             timeout: float = WAIT) -> Response:
        """One API request on a fresh connection; the answer, whatever its status."""
        return _request(self.api_socket, method, path, body, timeout)

    def ask(self, method: str, path: str, body: dict[str, Any] | None = None,
            timeout: float = WAIT) -> Response:
        """One API request that must succeed (2xx); VmmError with Firecracker's reason if not."""
        try:
            answer = self.call(method, path, body, timeout)
        except VmmError as e:
            raise VmmError(f"{e}{self._tail()}") from None
        if not 200 <= answer.status < 300:
            raise VmmError(f"Firecracker {self.name} refused {method} {path}: "
                           f"{answer.fault_message()}{self._tail()}")
        return answer

    def boot(self, config: GuestConfig, *, mem_mib: int = 256, kernel: Path | None = None,
             track_dirty_pages: bool = False, huge_pages: str | None = None) -> None:
        """Configure one vCPU with mem_mib MiB (hugepage-backed with huge_pages="2M") and
        start fcguest (built if needed) with `config` on its command line."""
        if not config.fits(mem_mib):
            raise ValueError(f"{config} does not fit in {mem_mib} MiB")
        self.ask("PUT", "/boot-source", {
            "kernel_image_path": self.vmm_path(kernel or fcguest.build()),
            "boot_args": config.cmdline()})
        machine: dict[str, Any] = {"vcpu_count": 1, "mem_size_mib": mem_mib,
                                   "track_dirty_pages": track_dirty_pages}
        if huge_pages is not None:
            machine["huge_pages"] = huge_pages
        self.ask("PUT", "/machine-config", machine)
        self.ask("PUT", "/actions", {"action_type": "InstanceStart"})

    def pause(self) -> int:
        """Pause the VM; the last round the guest printed before it (the round a snapshot
        taken now must go on from), 0 if none."""
        self.ask("PATCH", "/vm", {"state": "Paused"})
        time.sleep(SETTLE)  # the console thread reads what the guest printed before it
        seen = self.rounds()
        return seen[-1].number if seen else 0

    def resume(self) -> None:
        self.ask("PATCH", "/vm", {"state": "Resumed"})

    def snapshot(self, vmstate: Path, mem: Path, kind: str = "Full",
                 timeout: float = WAIT) -> None:
        """PUT /snapshot/create of the paused VM: `kind` "Full", or "Diff" (only the pages
        written since the last snapshot; the VM must track dirty pages). In a jail the files
        are written in the chroot and then moved to `vmstate` and `mem`."""
        targets = [vmstate, mem]
        if self.root is not None:
            targets = [self.root / f"snapshot.{p.name}" for p in (vmstate, mem)]
        self.ask("PUT", "/snapshot/create", {
            "snapshot_type": kind, "snapshot_path": self.vmm_path(targets[0]),
            "mem_file_path": self.vmm_path(targets[1])}, timeout)
        for written, wanted in zip(targets, (vmstate, mem), strict=True):
            if written != wanted:
                shutil.move(written, wanted)

    def load(self, vmstate: Path, *, uffd: Path | None = None, mem_file: Path | None = None,
             enable_diff_snapshots: bool = False, resume: bool = True,
             timeout: float = WAIT) -> float:
        """PUT /snapshot/load with its memory from a page server at `uffd` (the Uffd backend)
        or from `mem_file` (the File backend); the seconds to its answer (`load_started` is
        when it was sent: see `timed_rounds`). The body is what Firecracker 1.12 takes
        (`enable_diff_snapshots`)."""
        if (uffd is None) == (mem_file is None):
            raise ValueError("load: give exactly one of uffd= and mem_file=")
        backend = ({"backend_type": "Uffd", "backend_path": self.vmm_path(uffd)}
                   if uffd is not None else
                   {"backend_type": "File", "backend_path": self.vmm_path(mem_file)})
        self.load_started = start = time.monotonic()
        self.ask("PUT", "/snapshot/load", {
            "snapshot_path": self.vmm_path(vmstate), "mem_backend": backend,
            "enable_diff_snapshots": enable_diff_snapshots, "resume_vm": resume}, timeout)
        return time.monotonic() - start

    # -- the guest's console -------------------------------------------------------------

    def rounds(self) -> list[Round]:
        """Every whole progress line the guest has printed on this process's console."""
        assert self.console is not None, "not started"
        return [progress for _, progress in list(self.console.rounds)]

    def timed_rounds(self) -> list[tuple[float, Round]]:
        """The progress lines with the time.monotonic() each was read at (within a
        millisecond or so of the guest printing it): e.g. `timed_rounds()[0][0] -
        load_started` is the time from the load call to the guest's first progress."""
        assert self.console is not None, "not started"
        return list(self.console.rounds)

    def wait_rounds(self, count: int, timeout: float = WAIT) -> list[Round]:
        """Wait until the guest has printed `count` progress lines here; returns them all.
        VmmError if it stops (Firecracker exited, the guest halted) or the deadline passes."""
        console = self.console
        assert console is not None, "not started"
        console.wait(lambda: console.error is not None or len(console.rounds) >= count,
                     timeout, self.proc)
        if console.error is not None:
            raise VmmError(f"the guest halted: {console.error}")
        seen = self.rounds()
        if len(seen) < count:
            state = ("exited" if self.proc is not None and self.proc.poll() is not None
                     else f"still running after {timeout:g}s")
            raise VmmError(f"Firecracker {self.name}'s guest printed {len(seen)} of {count} "
                           f"rounds ({state}){self._tail()}")
        return seen

    def expect_progress(self, after: int, rounds: int = 2, timeout: float = WAIT
                        ) -> list[Round]:
        """Wait for `rounds` progress lines here and check that the guest went on from round
        `after`, the last it printed before its snapshot: the first line is round after+1 (or
        after+2, when the snapshot caught after+1 half printed), each next one more, every
        one ok. Returns them; GuestError if not. The first line after a load may report checks
        made before the snapshot (the pause can fall between a round's checks and its line):
        only the rounds after it prove what was loaded, so `rounds` should be 2 or more."""
        seen = self.wait_rounds(rounds, timeout)
        numbers = [r.number for r in seen]
        if numbers[0] not in (after + 1, after + 2):
            raise GuestError(f"the guest did not go on from round {after}: it printed "
                             f"rounds {numbers}")
        if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
            raise GuestError(f"the guest's round counter jumped: {numbers}")
        if bad := [r.line for r in seen if not r.ok]:
            raise GuestError(f"the guest found its memory wrong: {bad[0]}")
        return seen


def take_snapshot(workdir: Path, config: GuestConfig = GuestConfig(), *, rounds: int = 2,
                  mem_mib: int = 256, huge_pages: str | None = None,
                  track_dirty_pages: bool = False, timeout: float = WAIT) -> Snapshot:
    """Boot fcguest in a new Firecracker, let it print `rounds` good rounds, pause it, take a
    Full snapshot into workdir (gen0.state, gen0.mem), and kill it."""
    return take_snapshots(workdir, config, ("Full",), rounds=rounds, mem_mib=mem_mib,
                          huge_pages=huge_pages, track_dirty_pages=track_dirty_pages,
                          timeout=timeout)[0]


def take_snapshots(workdir: Path, config: GuestConfig = GuestConfig(),
                   kinds: Sequence[str] = ("Full", "Diff", "Diff"), *, rounds: int = 2,
                   mem_mib: int = 256, huge_pages: str | None = None,
                   track_dirty_pages: bool | None = None, timeout: float = WAIT
                   ) -> list[Snapshot]:
    """Boot fcguest in a new Firecracker and snapshot it once per `kinds` ("Full" or "Diff"),
    each after `rounds` more good rounds, into workdir/gen<i>.state and gen<i>.mem (a Diff's
    memory file is sparse: only the pages written since the snapshot before); the VM runs on
    between snapshots, and is killed after the last. Dirty pages are tracked when a Diff is
    asked for (or as `track_dirty_pages` says)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if track_dirty_pages is None:
        track_dirty_pages = "Diff" in kinds
    snapshots = []
    with Firecracker(workdir, "template") as vm:
        vm.boot(config, mem_mib=mem_mib, huge_pages=huge_pages,
                track_dirty_pages=track_dirty_pages)
        for generation, kind in enumerate(kinds):
            if generation:
                vm.resume()
            seen = vm.wait_rounds(len(vm.rounds()) + rounds, timeout)
            if bad := [r.line for r in seen if not r.ok]:
                raise GuestError(f"the guest found its memory wrong before its snapshot: "
                                 f"{bad[0]}")
            last = vm.pause()
            vmstate, mem = workdir / f"gen{generation}.state", workdir / f"gen{generation}.mem"
            vm.snapshot(vmstate, mem, kind, timeout)
            snapshots.append(
                Snapshot(vmstate, mem, kind, last, config, mem_mib, huge_pages))
    return snapshots


def _stop(proc: subprocess.Popen[bytes] | None, output: _Lines | None) -> None:
    """End an fcsnap process as a user would (SIGTERM; SIGKILL if it lingers) and read its
    output to the end."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(WAIT)
    if output is not None:
        output.join(WAIT)


class RestoreProcess:
    """`fcsnap restore ARGS --socket SOCKET` as its own process (this interpreter, and so this
    tree), not --quiet: `with` starts it and waits for its "serving" line (its build is open),
    or for its load's answer too with `--firecracker-api` (`loaded=True`), or only for its
    socket to exist (`socket_only`: as an orchestrator starting Firecracker then, looked at
    every millisecond). At exit it is stopped
    (SIGTERM, then SIGKILL) if still running; `finish()` instead waits for it to exit by
    itself (as it does once its VM has exited) and returns its status."""

    def __init__(self, socket: Path, *args: str | os.PathLike[str], loaded: bool = False,
                 env: dict[str, str] | None = None, socket_only: bool = False) -> None:
        self.socket = socket
        self.argv = [sys.executable, "-m", "fcsnap", "restore", *map(str, args),
                     "--socket", str(socket)]
        self.wait_loaded = loaded
        self.socket_only = socket_only
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr: _Lines | None = None

    def __enter__(self) -> RestoreProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, timeout: float = WAIT) -> RestoreProcess:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=self.env)
        assert self.proc.stderr is not None
        self.stderr = _Lines(self.proc.stderr, "restore-stderr")
        want = "fcsnap: Firecracker loaded" if self.wait_loaded else "fcsnap: serving "
        stderr = self.stderr
        if self.socket_only:
            deadline = time.monotonic() + timeout
            while not self.socket.exists() and self.proc.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.001)
            ready = self.socket.exists()
        else:
            ready = stderr.wait(lambda: any(x.startswith(want) for x in stderr.lines), timeout,
                                self.proc)
        if not ready:
            status = self.proc.poll()
            self.close()
            how = f"within {timeout:g}s" if status is None else f"(it exited {status})"
            what = "listen" if self.socket_only else f"print {want!r}"
            raise VmmError(f"fcsnap restore did not {what} {how}: {self.tail()}")
        return self

    def tail(self) -> str:
        return " | ".join(self.stderr.lines[-LOG_TAIL:]) if self.stderr else ""

    def finish(self, timeout: float = WAIT) -> int:
        """Wait for the process to exit by itself; its status (VmmError past the deadline)."""
        assert self.proc is not None, "not started"
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise VmmError(f"fcsnap restore did not exit within {timeout:g}s") from None
        assert self.stderr is not None
        self.stderr.join(WAIT)
        return status

    def close(self) -> None:
        _stop(self.proc, self.stderr)


def snapshot_a_restore(template: Snapshot, store: Path, workdir: Path, rounds: int,
                       *restore_args: str | os.PathLike[str]) -> tuple[Path, Path, int]:
    """Load `template` into a new Firecracker, its memory served by `fcsnap restore vm` from
    `store` (with `restore_args`); once the guest has printed `rounds` more good rounds, pause
    it, take a Full snapshot into workdir (gen1.state, gen1.mem) and kill it. (vmstate, memory
    file, the guest's last round); VmmError if the restore did not end with status 0."""
    vmstate, mem = workdir / "gen1.state", workdir / "gen1.mem"
    with Firecracker(workdir, "clone") as vm, RestoreProcess(
            workdir / "uffd.sock", "--vm", "vm", "--store", store, "--firecracker-api",
            vm.api_socket, *restore_args, loaded=True) as server:
        vm.expect_progress(template.last_round, rounds)
        last = vm.pause()
        vm.snapshot(vmstate, mem, "Full")
        vm.kill()
        if (status := server.finish()) != 0:
            raise VmmError(f"fcsnap restore ended with status {status}: {server.tail()}")
    return vmstate, mem, last


class Daemon:
    """`fcsnap serve --store STORE --api workdir/daemon.api` as its own process; `with` starts
    it and waits for its API socket, exit stops it (SIGTERM, then SIGKILL)."""

    def __init__(self, store: Path | str, workdir: Path, *args: str) -> None:
        self.api = workdir / "daemon.api"
        self.argv = [sys.executable, "-m", "fcsnap", "serve", "--store", str(store), "--api",
                     str(self.api), *args]
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr: _Lines | None = None

    def __enter__(self) -> Daemon:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        self.stderr = _Lines(self.proc.stderr, "daemon-stderr")
        deadline = time.monotonic() + WAIT
        while not self.api.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise VmmError(f"fcsnap serve did not listen: {' | '.join(self.stderr.lines)}")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        _stop(self.proc, self.stderr)

    def restore(self, vm: str, socket: Path, *args: str, timeout: float = WAIT) -> str:
        """`fcsnap restore --daemon API --vm VM --socket SOCKET ARGS`: the restore's id, once
        its socket listens (VmmError with its stderr if it does not exit 0)."""
        done = subprocess.run(
            [sys.executable, "-m", "fcsnap", "restore", "--daemon", str(self.api), "--vm", vm,
             "--socket", str(socket), *args],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise VmmError(f"restore --daemon exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout.strip()


def restore_in_process(build: str, socket: Path, vm: Firecracker, vmstate: Path, after: int,
                       *, rounds: int = 2, **options: Any) -> tuple[Served, list[Round]]:
    """fcsnap.api.restore(build, socket, **options) in this process (it must be the main
    thread: the API installs signal handlers), with `vm` (started, not booted) loading
    `vmstate` from it once it listens and the guest checked to go on from round `after`.
    The VM is then killed, which ends serving; returns (what restore returned, the rounds).
    A failed load or check is raised once serving has ended (SIGTERM to this process ends
    a server that no VM ever connected to)."""
    from fcsnap import api

    outcome: dict[str, Any] = {}

    def drive() -> None:
        try:
            vm.load(vmstate, uffd=socket)
            outcome["rounds"] = vm.expect_progress(after, rounds)
        except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
            outcome["error"] = e
        finally:
            vm.kill()
            if "error" in outcome:
                os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=drive, name="load-and-watch", daemon=True)
    # restore() puts back the handler it found: a SIGTERM sent as it returned lands here.
    previous = signal.signal(signal.SIGTERM, lambda _signum, _frame: None)
    try:
        served = api.restore(build, socket, on_listening=lambda _dir: thread.start(),
                             **options)
        thread.join(WAIT)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if "error" in outcome:
        raise outcome["error"]
    if "rounds" not in outcome:
        raise VmmError("the load-and-watch thread did not finish")
    return served, outcome["rounds"]
