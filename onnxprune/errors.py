"""Errors the CLI turns into one-line messages and exit codes."""


class OnnxPruneError(Exception):
    """Bad input or an operation that cannot be done: exit code 2, one line, no traceback."""

    exit_code = 2


class ParityError(OnnxPruneError):
    """The rewritten model does not compute the same function: exit code 1."""

    exit_code = 1


TORCH_INSTALL = "pip install 'onnxprune[torch]' (or any torch build of your own, >= 2.4)"


def require_torch(what: str):
    """PyTorch, or a one-line error saying how to install it: the core never needs it."""
    try:
        import torch
    except ImportError:
        raise OnnxPruneError(f"{what} needs PyTorch: {TORCH_INSTALL}") from None
    return torch
