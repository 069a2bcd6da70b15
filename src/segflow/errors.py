"""The one exception type that reaches users as a one-line message instead of a traceback."""


class SegflowError(Exception):
    """A problem with the user's input or configuration.

    The message must name the offending file, CSV row or config key; the CLI prints it as a single
    line and exits with status 2.
    """
