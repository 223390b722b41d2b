"""Exceptions that map onto the BIDS-Apps execution-spec exit codes.

Every failure a user can cause ends in one of these, caught by the CLI, which prints the message
(naming the file and the problem) and exits with ``exit_code``; no traceback reaches the user.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_NODE_FAILED = 1
EXIT_VALIDATION = 16
EXIT_NOTHING_SELECTED = 18
EXIT_USAGE = 64
EXIT_BAD_DATA = 65
EXIT_MISSING_INPUT = 66
EXIT_CANNOT_WRITE = 73


class QmriBidsError(Exception):
    """Base class: a user-facing error with a documented exit code."""

    exit_code: int = EXIT_NODE_FAILED


class UsageError(QmriBidsError):
    exit_code = EXIT_USAGE


class ValidationError(QmriBidsError):
    exit_code = EXIT_VALIDATION


class NothingSelectedError(QmriBidsError):
    exit_code = EXIT_NOTHING_SELECTED


class BadDataError(QmriBidsError):
    """An input file exists but its content cannot be used (corrupt, wrong shape, NaN...)."""

    exit_code = EXIT_BAD_DATA


class MissingInputError(QmriBidsError):
    exit_code = EXIT_MISSING_INPUT


class CannotWriteError(QmriBidsError):
    exit_code = EXIT_CANNOT_WRITE


class NodeFailedError(QmriBidsError):
    exit_code = EXIT_NODE_FAILED
