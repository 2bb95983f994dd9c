"""Errors the CLI turns into one-line messages and exit codes."""


class OnnxPruneError(Exception):
    """Bad input or an operation that cannot be done: exit code 2, one line, no traceback."""

    exit_code = 2


class ParityError(OnnxPruneError):
    """The rewritten model does not compute the same function: exit code 1."""

    exit_code = 1
