"""The command line's own error: a bad flag value, named in the message."""


class CommandError(ValueError):
    """A bad command line: the message names the flag. ``fastfuse.cli.main`` prints it as
    ``fastfuse: error: ...`` and exits with status 2."""
