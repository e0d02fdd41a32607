"""The error types: every failure fcsnap foresees is an FcsnapError, one line for the user."""


class FcsnapError(Exception):
    """A runtime failure the user can act on: bad or corrupt input, failed verification, I/O.
    The command line prints it as one line and exits 1."""


class UsageError(FcsnapError):
    """An argument that can never work, whatever the files hold (`--compress gzip`, an offset
    that is not a number, `vmstate` without a Firecracker API socket): exit status 2."""
