"""The `fcsnap` command line (typer): parse options, call the Python API (fcsnap.api), print
results. The commands live in the modules of this package, one per group; this module runs
them and turns what they raise into exit statuses.

Exit statuses: 0 done, 1 a runtime failure (one line `fcsnap: error: ...`; `--debug` anywhere
on the line or FCSNAP_DEBUG=1 adds the traceback; none when a pipe's reader stopped early), 2 a
usage error (one line too, before anything is read or written), 130 interrupted (SIGINT), 143
terminated (SIGTERM; `restore` and `serve` handle SIGTERM themselves once serving: they exit 0).

Modules are imported by the command that needs them: `--help` costs the interpreter, typer and
rich; `restore` listens before it imports the server and opens the build (uffd/opening.py).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, NoReturn

PROG = "fcsnap"
USAGE_ERROR = 2
INTERRUPTED = 130
TERMINATED = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where SIGINT raises KeyboardInterrupt, so that a command stopped by
    either (a service manager, `timeout`, `kill`) undoes its staging and partial output the
    same way."""


def _terminate(_signum: int, _frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second one must not cut cleanup
    raise Terminated


def usage_error(message: str, prog: str = PROG) -> NoReturn:
    print(f"{PROG}: error: {message} (see '{prog} --help')", file=sys.stderr)
    sys.exit(USAGE_ERROR)


def run(argv: list[str] | None = None) -> int:
    """Parse and run one command; return its exit status. Raises what the command raised;
    a usage error the framework found exits 2 here, with one line."""
    from typer._click.exceptions import NoArgsIsHelpError, UsageError

    from fcsnap.cli.common import CommandFailed, state

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or {"-h", "--help", "ws"} & set(args):  # help may be rendered
        from fcsnap.cli.lean_help import defer_unused_rich

        defer_unused_rich()
    cut = args.index("--") if "--" in args else len(args)
    if "--debug" in args[:cut]:  # anywhere before `--`: the root option, also after a command
        _state["debug"] = True
        args = [a for a in args[:cut] if a != "--debug"] + args[cut:]
    try:
        status: Any = command_tree().main(args, prog_name=PROG, standalone_mode=False)
    except CommandFailed as e:
        raise e.error from None
    except NoArgsIsHelpError:  # the help is printed; a command line without one is misuse
        sys.exit(USAGE_ERROR)
    except UsageError as e:
        state["command"] = e.ctx.command_path if e.ctx is not None else PROG
        from fcsnap.errors import redact

        usage_error(redact(_one_line(e.format_message())), state["command"])
    return status if isinstance(status, int) else 0


def _one_line(message: str) -> str:
    return " ".join(message.split())


_state = {"debug": os.environ.get("FCSNAP_DEBUG") == "1"}

# Commands whose process ends at once when they succeed (see _end_now).
END_NOW = frozenset({f"{PROG} pack", f"{PROG} diff", f"{PROG} squash", f"{PROG} import",
                     f"{PROG} export"})


def _end_now(status: int) -> NoReturn:
    """End the process without tearing the interpreter down: freeing every object of numpy
    and of the interpreter costs a build command about a tenth of its time, and no one waits
    for it. Exit handlers run first and output is flushed; with a thread of ours still
    running, the ordinary exit waits for it instead."""
    import atexit

    main_thread = threading.main_thread()
    if any(t is not main_thread and not t.daemon and t.is_alive() for t in threading.enumerate()):
        sys.exit(status)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv: list[str] | None = None) -> NoReturn:
    """Console entry point: one clear line and exit 1 for runtime failures, 2 for usage."""
    from fcsnap.cli.common import state
    from fcsnap.errors import FcsnapError, UsageError, redact

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        status = run(argv)
        sys.stdout.flush()
        if argv is None and state["command"] in END_NOW:  # the process's own command line
            _end_now(status)
    except UsageError as e:
        _traceback()
        usage_error(redact(str(e)), state["command"])
    except (FcsnapError, OSError) as e:
        if isinstance(e, BrokenPipeError) and _reader_gone():
            # `fcsnap inspect ... | head`: the reader has what it wanted; nothing to report.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        _traceback()
        if isinstance(e, FcsnapError):
            message = str(e)
        else:  # an OSError of a write has no file name: then say what was being done
            message = f"{e.strerror or e}: {e.filename}" if e.filename else f"{e.strerror or e}"
        print(f"{PROG}: error: {redact(message)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        print(f"{PROG}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        sys.exit(TERMINATED if terminated else INTERRUPTED)
    except Exception as e:  # a bug: still one line, and the traceback on request
        _traceback()
        print(
            f"{PROG}: error: internal error ({type(e).__name__}: {redact(str(e))}); "
            "run with --debug or FCSNAP_DEBUG=1 for the traceback",
            file=sys.stderr,
        )
        sys.exit(1)
    sys.exit(status)


def _reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end is closed (a broken pipe of a socket, say to
    Firecracker, is a failure to report)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def _traceback() -> None:
    if _state["debug"]:
        import traceback

        traceback.print_exc()


def command_tree() -> Any:
    """The click command tree typer builds from the app (for tests and documentation)."""
    from typer.main import get_command

    from fcsnap.cli.app import app

    return get_command(app)
