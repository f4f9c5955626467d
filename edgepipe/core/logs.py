"""Scoped quiet: third-party loggers and prints muted for a block, their state restored after (nothing global)."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def muted(*names: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise the level of the named loggers ("" is the root logger) for the block; restore each after."""
    loggers = [logging.getLogger(n or None) for n in names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, before, strict=True):
            lg.setLevel(lvl)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """ORT's tools log to the root logger and print freely; keep the user's terminal for our progress."""
    with muted(""), contextlib.redirect_stdout(io.StringIO()):
        yield
