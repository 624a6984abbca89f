"""The one exception type for bad input: the CLI prints its message (no traceback) and exits 2."""


class PrefpipeError(Exception):
    """Bad options, a wrong schema, a missing file: the message says what to change."""
