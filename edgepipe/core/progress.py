"""Progress for long steps: a live spinner on a terminal, plain lines otherwise (CI logs)."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import TextIO


class Progress:
    """Callable logger: ``progress("export ...")`` prints a line; on a TTY a spinner shows the current step."""

    def __init__(self, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.quiet = quiet
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self._status = None
        if self.tty and not quiet:
            from rich.console import Console

            self._console = Console(file=self.stream, highlight=False)

    def __call__(self, message: str) -> None:
        if self.quiet:
            return
        if not self.tty:
            print(message, file=self.stream, flush=True)
            return
        self._console.print(message, markup=False)
        if self._status is None:
            self._status = self._console.status(message.strip())
            self._status.start()
        else:
            self._status.update(message.strip())

    def close(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


class ProgressHandler(logging.Handler):
    """A logging handler that shows the edgepipe loggers' INFO lines on a Progress."""

    def __init__(self, progress: Progress) -> None:
        super().__init__(logging.INFO)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        self.progress(record.getMessage())

    @classmethod
    @contextlib.contextmanager
    def installed(cls, progress: Progress, name: str = "edgepipe") -> Iterator[None]:
        """Attach to logger ``name`` (INFO) for the block; its level and handlers are restored after."""
        log = logging.getLogger(name)
        handler, level = cls(progress), log.level
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        try:
            yield
        finally:
            log.removeHandler(handler)
            log.setLevel(level)
