"""Commands that talk to a running `fcsnap serve`: ps (its restores), stop (end one) and
checkpoint (store what a VM wrote as a new generation)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fcsnap.cli.common import Json, command, print_json, usage_error

app = typer.Typer()

DaemonOpt = Annotated[Path, typer.Option(
    "--daemon", metavar="API", help="The API socket of 'fcsnap serve' (its --api).",
    show_default=False)]
TIMEOUT = 30.0  # seconds the daemon has to answer (stop: the VM may take a while to end)


def _ask(api: Path, method: str, path: str) -> Any:
    """The daemon's JSON answer, or its error as one line."""
    from fcsnap.daemon.client import call_daemon
    from fcsnap.errors import FcsnapError

    status, answer = call_daemon(api, method, path, None, TIMEOUT)
    if status != 200:
        message = answer.get("error") if isinstance(answer, dict) else None
        raise FcsnapError(message or f"the fcsnap daemon at {api} answered HTTP {status}")
    return answer


@command(app, "ps", ["fcsnap ps --daemon /run/fcsnap.sock",
                     "fcsnap ps --daemon /run/fcsnap.sock --json"])
def ps(daemon: DaemonOpt, json_out: Json = False) -> int:
    """List the daemon's restores: their VM, build, state and counters."""
    rows = _ask(daemon, "GET", "/restores")
    if json_out:
        print_json({"restores": rows})
        return 0
    from fcsnap.render import table
    from fcsnap.store.format.prefixes import short_id
    from fcsnap.units import format_bytes

    columns = ("id", "vm", "build", "state", "vm pid", "faults", "pages", "served")
    print(table(columns, [(
        r["id"], r["vm"], short_id(r["build_id"] or "-"), r["state"], str(r.get("vm_pid") or "-"),
        str(r["faults"]), str(r["pages_served"]), format_bytes(r["bytes_served"]),
    ) for r in rows], title="Restores", left=("id", "vm", "build", "state")))
    return 0


@command(app, "stop", ["fcsnap stop --daemon /run/fcsnap.sock 3f2a9c"])
def stop(
    restore_id: Annotated[str, typer.Argument(
        metavar="ID", help="The restore to end (its id, as ps lists it).", show_default=False)],
    daemon: DaemonOpt, json_out: Json = False,
) -> int:
    """End one of the daemon's restores, as SIGTERM ends 'restore' (the VM is killed unless
    every page is in place); print its final statistics."""
    from urllib.parse import quote

    document = _ask(daemon, "DELETE", f"/restores/{quote(restore_id, safe='')}")
    if json_out:
        print_json(document)
    else:
        print(f"stopped {restore_id}: {document.get('exit_reason') or document.get('state')}")
    return 0


@command(app, "checkpoint", [
    "fcsnap checkpoint 5f0c... --daemon /run/fcsnap.sock --name web-after-boot",
], help="The next generation of a VM a daemon serves with track_writes, from the pages it "
        "wrote.\n\nThe VM must be paused (the daemon pauses and resumes it itself when the "
        "restore has firecracker_api); the pages written since the last checkpoint are read "
        "from its memory and stored as a diff over that checkpoint (at first: the build "
        "served), published as NAME.")
def checkpoint(
    restore_id: Annotated[str, typer.Argument(
        metavar="ID", help="The restore's id (as restore --daemon printed it).",
        show_default=False)],
    daemon: DaemonOpt,
    name: Annotated[str, typer.Option(
        "--name", metavar="NAME", help="The name to publish the checkpoint under.",
        show_default=False)],
    background: Annotated[bool, typer.Option(
        "--background", help="Pause the VM only to take the written set: its pages are "
        "copied after the resume, as they were at the pause (waits for the copy).")] = False,
    copy_rate: Annotated[int, typer.Option(
        "--copy-rate", metavar="BYTES", min=0, help="With --background: read at most BYTES a "
        "second of guest memory (0: no limit).")] = 0,
) -> int:
    from fcsnap.daemon.client import checkpoint_via_daemon, wait_checkpoint

    if copy_rate and not background:
        usage_error("--copy-rate paces the --background copy: give --background too")
    answer = checkpoint_via_daemon(daemon, restore_id, name, background, copy_rate)
    if background:
        answer = wait_checkpoint(daemon, restore_id, answer["checkpoint"])
    print(answer["build_id"])
    return 0
