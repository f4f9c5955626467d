"""One error family: bad input (exit 2), failed checks (exit 1), internal errors (exit 3)."""

from __future__ import annotations

import re


class EdgepipeError(Exception):
    """Base of every error edgepipe reports to a user; ``exit_code`` is the CLI's.

    The message is always one line: users read the first line and CI logs grep it.
    """

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class BadInput(EdgepipeError):
    """The user gave something edgepipe cannot use: one line saying what to fix."""

    exit_code = 2


class CheckFailed(EdgepipeError):
    """A model or artifact failed a check (accuracy, export parity, verify)."""

    exit_code = 1


class InternalError(EdgepipeError):
    """A bug in edgepipe (or a pass): not the user's to fix; ``--debug`` shows the traceback."""

    exit_code = 3


class PassError(InternalError):
    """A pass raised an unexpected exception; names the pass and the passes that ran before it (onnx-ir's model)."""

    def __init__(self, name: str, before: list[str], cause: BaseException) -> None:
        after = f" after the following passes: {', '.join(before)}" if before else " (the first pass of its chain)"
        super().__init__(f"pass {name} raised {type(cause).__name__}: {one_line(str(cause))[:300]}{after}")
        self.pass_name = name


def classify(exc: BaseException) -> tuple[int, str]:
    """(exit code, one-line reason) for an exception that ended a build unit.

    edgepipe's own errors keep their code; OSError is the user's environment (disk, permissions): 2;
    anything else is a bug: 3.
    """
    if isinstance(exc, EdgepipeError):
        return exc.exit_code, str(exc)
    if isinstance(exc, OSError):
        return 2, explain(exc) or one_line(str(exc))
    return 3, f"{type(exc).__name__}: {one_line(str(exc))[:300]}"


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(text: str) -> str:
    """Collapse a message to one line (users read the first line; CI logs grep it), without terminal colour codes
    (torch.export colours parts of its errors)."""
    return " ".join(_ANSI.sub("", str(text)).split())


# Known failure texts from onnx / onnxruntime / torch / protobuf, turned into what to do about them.
KNOWN_ERRORS: list[tuple[str, str]] = [
    ("Unsupported model IR version", "the model's IR version is newer than this onnxruntime supports; export with an older opset/IR or upgrade onnxruntime"),
    ("is under development and support for this is limited", "the model's opset is newer than this onnxruntime supports; export with a lower opset (model.opset in the recipe)"),
    ("is not a registered function/op", "the model uses an op this onnxruntime does not know (a custom domain?); register its custom-op library or replace the op"),
    ("Failed to find kernel for", "onnxruntime has no kernel for an op/type in this model; keep that node in float32 or pick another target/provider"),
    ("2GB", "the model exceeds protobuf's 2 GB limit; save it with external data (edgepipe does this for large models) or check the source"),
    ("exceeds maximum protobuf size", "the model exceeds protobuf's 2 GB limit; use external data"),
    ("No space left on device", "the disk is full; free space or choose another -o folder"),
    ("Permission denied", "a file or folder is not writable/readable; check permissions or choose another -o folder"),
    ("data-dependent", "the model branches on tensor values (data-dependent control flow); rewrite with torch.where / torch.cond, or try model.exporter: torchscript and check the result"),
    ("is not supported", "the exporter does not support an operator at this opset; try a newer opset (model.opset) or model.exporter: torchscript"),
]


def explain(exc: BaseException) -> str | None:
    """The actionable line for a known third-party failure, or None."""
    text = f"{type(exc).__name__}: {exc}"
    for needle, advice in KNOWN_ERRORS:
        if needle in text:
            first = one_line(text)
            return f"{advice} ({first[:240]})"
    return None
