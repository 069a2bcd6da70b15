"""The one exception type that reaches users as a one-line message instead of a traceback."""


class SegflowError(Exception):
    """A problem with the user's input or configuration.

    The message must name the offending file, CSV row or config key; the CLI prints it as a single
    line and exits with status 2.
    """


def first_line(exc: BaseException) -> str:
    """The informative line of an exception message (torch's weights-only errors are long)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported global" in line:
            return line.split(" was not an allowed global")[0]
    return lines[0] if lines else type(exc).__name__
