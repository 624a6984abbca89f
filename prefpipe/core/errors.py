"""The one exception type for bad input, and the click group that prints it (no traceback, exit 1).

Bad input never shows a traceback: a PrefpipeError (raised where the file, row or option is known) is one
message; a decode error, invalid Parquet or invalid JSON that escapes to the command line is turned into one
message too, naming what the library said. `prefpipe --debug ...` (or PREFPIPE_DEBUG=1) shows tracebacks
instead, for our own bugs.
"""

import json
import os

import click


class PrefpipeError(Exception):
    """Bad options, a wrong schema, a missing file: the message says what to change."""


def is_bad_input(e: BaseException) -> bool:
    """Errors that come from the data rather than from prefpipe: undecodable text, invalid JSON or Parquet."""
    if isinstance(e, (PrefpipeError, UnicodeDecodeError, json.JSONDecodeError)):
        return True
    return type(e).__module__.startswith("pyarrow") and type(e).__name__ in ("ArrowInvalid", "ArrowIOError")


def debugging() -> bool:
    return os.environ.get("PREFPIPE_DEBUG", "") not in ("", "0")


class PrefpipeGroup(click.Group):
    """Turns bad input into a one-paragraph message and exit status 1, no traceback (unless debugging)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as e:
            if debugging() or not is_bad_input(e):
                raise
            message = str(e) if isinstance(e, PrefpipeError) else f"bad input ({type(e).__name__}): {e}"
            raise click.ClickException(message) from e
