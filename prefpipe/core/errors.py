"""The one exception type for bad input, and the click group that prints it (no traceback, exit 1)."""

import click


class PrefpipeError(Exception):
    """Bad options, a wrong schema, a missing file: the message says what to change."""


class PrefpipeGroup(click.Group):
    """Turns PrefpipeError (bad input) into a one-paragraph message and exit status 1, no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PrefpipeError as e:
            raise click.ClickException(str(e)) from e
