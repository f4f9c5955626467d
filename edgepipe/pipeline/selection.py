"""Which targets a run builds, and where it may write: checks shared by every build path (encoders, decoders)."""

from __future__ import annotations

import os
from pathlib import Path

from edgepipe.core.errors import BadInput
from edgepipe.recipe import Recipe
from edgepipe.targets import TARGETS


def select_targets(recipe: Recipe, only: list[str] | None) -> list[str]:
    names = list(recipe.targets)
    if not only:
        return names
    for name in only:
        if name not in TARGETS:
            raise BadInput(f"unknown target '{name}'; valid targets: {', '.join(TARGETS)}")
    missing = [n for n in only if n not in names]
    if missing:
        raise BadInput(f"--target {','.join(missing)} is not in the recipe's targets {names}; add it to the recipe")
    return [n for n in names if n in only]


def check_writable(out: Path) -> None:
    """The output folder (or its nearest existing parent) must be a writable folder."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise BadInput(f"output folder {out} is not writable ({probe} is not a writable folder); choose another -o folder")
