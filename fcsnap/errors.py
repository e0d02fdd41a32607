"""The error types: every failure fcsnap foresees is an FcsnapError, one line for the user;
and `redact`, which every line shown to a user or a log goes through."""

import re

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s?#]*@")


def redact(text: str) -> str:
    """`text` with the user and password of every URL in it replaced by `***`: an endpoint
    given as http://user:pass@host (AWS_ENDPOINT_URL) must not reach a terminal, a log or an
    API client whole."""
    return _USERINFO.sub(r"\1***@", text)


class FcsnapError(Exception):
    """A runtime failure the user can act on: bad or corrupt input, failed verification, I/O.
    The command line prints it as one line and exits 1."""


class UsageError(FcsnapError):
    """An argument that can never work, whatever the files hold (`--compress gzip`, an offset
    that is not a number, `vmstate` without a Firecracker API socket): exit status 2."""


class FetchPending(Exception):  # noqa: N818 (not an error: a state to wait out)
    """What a fault server asked for is being fetched from object storage: it serves other
    faults (other VMs on its reactor) meanwhile and asks again shortly. Raised only to a
    fault server's reads (the chunk cache's serving mode), never to one that may block
    (unpack, squash, verify)."""
