"""The one error type the CLI turns into a single line on stderr and exit status 1."""


class FcsnapError(Exception):
    """A runtime failure the user can act on: bad or corrupt input, failed verification, I/O."""
