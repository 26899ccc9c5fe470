"""One exception type for every problem a user can fix.

The CLI prints an `MLPMemError` as a single line and exits non-zero; anything else is a bug and
keeps its traceback. Messages say what is wrong *and* what to do about it.
"""


class MLPMemError(Exception):
    """A user-facing error: bad input, mismatched artifacts, missing files."""
