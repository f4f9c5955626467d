"""The one result of a build unit (one recipe, one target), whatever ran it: in-process, a child, a pool or Ray."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

JSON_SCHEMA_VERSION = 1  # of `edgepipe build --json`

# status → exit code: passed 0; failed (a check failed, nothing published) 1; crashed (its process died) 1;
# error: the exit code of its error (2 bad input, 3 internal error)
PASSED, FAILED, CRASHED, ERROR = "passed", "failed", "crashed", "error"


@dataclasses.dataclass
class TargetResult:
    """What building one (recipe, target) gave: status, manifest, the published folder or the reason it failed."""

    name: str  # the recipe's name
    target: str
    status: str  # passed | failed | crashed | error
    error: str | None = None  # one line: why it did not pass
    exit_code: int = 0
    manifest: dict[str, Any] = dataclasses.field(default_factory=dict)
    folder: Path | None = None  # the published artifact
    recipe: str = ""  # the recipe file
    seconds: float = 0.0
    attempts: int = 1
    where: str = ""  # host:pid that built it
    traceback: str | None = None  # for an internal error: shown with --debug
    files: dict[str, bytes] = dataclasses.field(default_factory=dict, repr=False)  # a remote worker's artifact, in transit

    @property
    def passed(self) -> bool:
        return self.status == PASSED


def exit_code(results: list[TargetResult]) -> int:
    """The run's exit code: the gravest of its units (3 internal > 2 bad input > 1 failed or crashed > 0)."""
    return max((r.exit_code for r in results), default=0)


def as_json_refused(code: int, error: str) -> dict[str, Any]:
    """The `--json` document of a run refused before any unit started (bad input: exit 2): the same schema, no
    units, the one error line, so a CI step that parses stdout reads why instead of failing on an empty file."""
    return {"schema_version": JSON_SCHEMA_VERSION, "passed": False, "exit_code": code, "error": error, "reports": {}, "units": []}


def as_json(results: list[TargetResult], reports: dict[str, Path], archives: dict[tuple[str, str], Path]) -> dict[str, Any]:
    """The `--json` document: the same schema for every executor."""
    return {
        "schema_version": JSON_SCHEMA_VERSION,
        "passed": all(r.passed for r in results),
        "exit_code": exit_code(results),
        "reports": {k: str(v) for k, v in reports.items()},
        "units": [
            {
                "recipe": r.recipe, "name": r.name, "target": r.target, "passed": r.passed, "status": r.status, "error": r.error,
                "folder": str(r.folder) if r.folder else None, "seconds": r.seconds, "attempts": r.attempts, "where": r.where,
                "archive": str(archives[(r.name, r.target)]) if (r.name, r.target) in archives else None,
                "accuracy": r.manifest.get("accuracy"), "size": r.manifest.get("size"), "latency": r.manifest.get("latency"),
                "content_sha256": r.manifest.get("content_sha256"),
            }
            for r in results
        ],
    }
