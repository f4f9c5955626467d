"""The Python API: ``edgepipe.build(...)`` and ``edgepipe.verify(...)``, what notebooks and other tools call.

Same path as the CLI (plan → executor → publish → report); bad input raises ``BadInput`` before anything is
built, every other problem is the result of the target it hit.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from edgepipe.core.result import TargetResult, exit_code


@dataclasses.dataclass(frozen=True)
class BuildResult:
    """One result per (recipe, target) and the HTML report of each recipe."""

    targets: list[TargetResult]
    reports: dict[str, Path]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.targets)

    @property
    def exit_code(self) -> int:
        """What the CLI would exit with: 0, 1 (a check failed or a target crashed), 2 (bad input), 3 (a bug)."""
        return exit_code(self.targets)

    def __getitem__(self, target: str) -> TargetResult:
        return next(r for r in self.targets if r.target == target)


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """Every check verify ran on an artifact folder (or its .tar.gz)."""

    path: Path
    checks: list  # of edgepipe.pipeline.verify.Check: name, passed, detail, seconds

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


def build(recipe: str | Path, out: str | Path = "out", targets: list[str] | str | None = None, force: bool = False,
          executor: str = "inprocess", jobs: int = 1) -> BuildResult:
    """Build a recipe file's targets (all, or ``targets``) into ``out``; ``executor``: inprocess | local | ray."""
    from edgepipe.cli.build import finish, plan
    from edgepipe.scale.executor import run_units

    only = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else targets
    units = plan([str(recipe)], Path(out), only, force)
    results = run_units(units, executor, jobs)
    reports, _ = finish(results, Path(out), archive=False)
    return BuildResult(results, reports)


def verify(path: str | Path, trust: Any = None) -> VerifyResult:
    """Re-hash an artifact and rerun its golden I/O with its own runtime.

    ``trust``: also check its signature (``model.sig``) with a verifying config from
    ``edgepipe.core.sign.verifier(public_key=...)``.
    """
    from edgepipe.core.archive import extracted, is_archive
    from edgepipe.core.errors import BadInput
    from edgepipe.pipeline.verify import verify as verify_folder

    path = Path(path)
    if is_archive(path):
        with extracted(path) as inner:
            return VerifyResult(path, verify_folder(inner, trust))
    if not path.is_dir():
        raise BadInput(f"{path} is not an artifact folder or .tar.gz; pass OUT/<name>/<target> or its archive")
    return VerifyResult(path, verify_folder(path, trust))
