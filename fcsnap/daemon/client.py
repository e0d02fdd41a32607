"""`fcsnap restore --daemon PATH`: ask a running daemon to serve the VM instead of serving it.

The options become a `POST /restores` body (paths made absolute: the daemon's working
directory is not ours); the daemon answers once the VM socket listens (with
`firecracker_api`, once Firecracker has answered the snapshot load), or with one line.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fcsnap.errors import FcsnapError
from fcsnap.restore_options import DEFAULT_API_TIMEOUT
from fcsnap.unix_http import AnswerError, UnixHTTPConnection, exchange

PATH_KEYS = ("socket", "stats", "record_ws", "prefetch_ws", "firecracker_api", "vmstate",
             "written")
ANSWER_TIMEOUT = 30.0  # seconds the daemon has to answer a POST (it answers once listening)
HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
MAX_ANSWER = 1 << 20
CHECKPOINT_TIMEOUT = 300.0  # seconds more a checkpoint may take (it writes a generation)
WAIT_POLL = 0.02  # seconds between two looks at a background checkpoint's copy


def restore_body(vm: str, options: dict[str, Any]) -> dict[str, Any]:
    """The request body: `vm` as given unless it names a directory (made absolute), every
    path absolute, options left at None omitted (the daemon applies restore's defaults)."""
    body: dict[str, Any] = {"vm": os.path.abspath(vm) if "/" in vm else vm}
    for key, value in options.items():
        if value is None or value == [] or value is False:
            continue
        body[key] = os.path.abspath(value) if key in PATH_KEYS else value
    return body


def call_daemon(api: Path, method: str, path: str, body: object | None, timeout: float
                ) -> tuple[int, Any]:
    """(status, decoded JSON answer) of one request to the daemon; FcsnapError when the
    daemon cannot be reached or answers something that is not JSON."""
    connection = UnixHTTPConnection(api, timeout)
    try:
        try:
            connection.connect()
        except OSError as e:
            raise FcsnapError(f"cannot reach the fcsnap daemon at {api}: "
                              f"{e.strerror or 'timed out'} (is `fcsnap serve` running?)") from None
        data = b"" if body is None else json.dumps(body).encode()
        try:
            answer, raw = exchange(connection, method, path, data, HEADERS, MAX_ANSWER)
        except (AnswerError, OSError) as e:
            raise FcsnapError(f"the fcsnap daemon at {api} did not answer: {e}") from None
        try:
            return answer.status, json.loads(raw)
        except ValueError:
            raise FcsnapError(f"the fcsnap daemon at {api} answered HTTP {answer.status} "
                              "without JSON") from None
    finally:
        connection.close()


def ask_daemon(api: Path, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    """POST /restores; the daemon's answer ({"id", "socket", "build_id"}) or its error
    (Firecracker's refusal of the snapshot load, 502, as Firecracker said it)."""
    status, answer = call_daemon(api, "POST", "/restores", body, timeout)
    if status != 201:
        message = answer.get("error") if isinstance(answer, dict) else None
        if status == 502 and message:
            raise FcsnapError(message)
        raise FcsnapError(f"the daemon refused the restore: {message or f'HTTP {status}'}")
    return answer


def restore_via_daemon(api: Path, vm: str, options: dict[str, Any]) -> dict[str, Any]:
    """`fcsnap restore --daemon`: restore's options sent as one request (given the time a
    snapshot load may take when the daemon is to ask Firecracker for one)."""
    timeout = ANSWER_TIMEOUT
    if options.get("firecracker_api") is not None:
        timeout += options.get("api_timeout") or DEFAULT_API_TIMEOUT
    return ask_daemon(api, restore_body(vm, options), timeout)


def checkpoint_via_daemon(api: Path, restore_id: str, name: str, background: bool = False,
                          copy_rate: int = 0) -> dict[str, Any]:
    """POST /restores/ID/checkpoint; the daemon's answer (in the background: at the resume,
    the copy going on: `wait_checkpoint`), or its refusal as one line."""
    url = f"/restores/{quote(restore_id, safe='')}/checkpoint"
    body: dict[str, Any] = {"name": name}
    if background:
        body.update(background=True, copy_rate=copy_rate)
    status, answer = call_daemon(api, "POST", url, body, ANSWER_TIMEOUT + CHECKPOINT_TIMEOUT)
    if status != (202 if background else 201):
        message = answer.get("error") if isinstance(answer, dict) else None
        raise FcsnapError(f"the daemon refused the checkpoint: {message or f'HTTP {status}'}")
    if background and not isinstance(answer.get("checkpoint"), int):
        raise FcsnapError("the daemon's answer numbers no checkpoint, so its end cannot be "
                          "waited for (a daemon older than this fcsnap?)")
    return answer


def wait_checkpoint(api: Path, restore_id: str, number: int,
                    timeout: float = CHECKPOINT_TIMEOUT) -> dict[str, Any]:
    """Wait for background checkpoint `number`'s copy to end: its state ("done", with its
    "build_id"); FcsnapError (one line) if it failed or took over `timeout`. (Its own by
    number: another client's checkpoint of the same VM may have begun since.)"""
    url = f"/restores/{quote(restore_id, safe='')}/checkpoints/{number}"
    deadline = time.monotonic() + timeout
    while True:
        status, document = call_daemon(api, "GET", url, None, ANSWER_TIMEOUT)
        if status != 200:
            message = document.get("error") if isinstance(document, dict) else None
            raise FcsnapError(f"the daemon: {message or f'HTTP {status}'}")
        if document.get("state") == "done":
            return document
        if document.get("state") == "failed":
            raise FcsnapError(f"the checkpoint {document.get('name')!r} failed: "
                              f"{document.get('error')}")
        if time.monotonic() > deadline:
            raise FcsnapError(f"the checkpoint's copy did not end within {timeout:g}s")
        time.sleep(WAIT_POLL)
