"""The exceptions onnxprune raises, and the exit codes the CLI maps them to.

A user error is normal input: it carries a message a person can act on and the CLI turns it
into one line and exit code 2. Anything else escaping the library is a bug (exit code 1).
"""

from __future__ import annotations


class OnnxPruneError(Exception):
    """Base class of every error onnxprune raises on purpose."""

    exit_code = 1


class UserError(OnnxPruneError):
    """Bad input or arguments: a missing file, a malformed model, a ratio out of range..."""

    exit_code = 2


class FidelityError(OnnxPruneError):
    """The pruned model's fidelity on probes fell below the threshold the user asked for."""

    exit_code = 3


class InternalError(OnnxPruneError):
    """An invariant of onnxprune itself broke (a bug): the message says what and where."""

    exit_code = 1


def first_line(exc: BaseException) -> str:
    """The first non-blank line of ``exc``'s message, stripped (its type's name when it has
    none): what a one-line report quotes of onnxruntime's or Pillow's multi-line errors."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
