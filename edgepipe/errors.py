"""One error family: bad input (exit 2) and failed checks (exit 1)."""

from __future__ import annotations


class EdgepipeError(Exception):
    """Base of every error edgepipe reports to a user; ``exit_code`` is the CLI's."""

    exit_code = 2


class BadInput(EdgepipeError):
    """The user gave something edgepipe cannot use: one line saying what to fix."""

    exit_code = 2


class CheckFailed(EdgepipeError):
    """A model or artifact failed a check (accuracy, export parity, verify)."""

    exit_code = 1


def one_line(text: str) -> str:
    """Collapse a message to one line (users read the first line; CI logs grep it)."""
    return " ".join(str(text).split())
