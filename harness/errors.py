"""One error type for bad input: the CLI prints its message on one line and exits non-zero."""


class KvbenchError(Exception):
    """A user-facing error: the message names the bad value and the allowed ones, or the fix."""
