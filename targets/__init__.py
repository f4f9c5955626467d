"""Target registry: profile names used in recipes and on the command line."""

from __future__ import annotations

from edgepipe.targets.base import Emitted, Target, TargetContext, Variant
from edgepipe.targets.cpu import CpuTarget
from edgepipe.targets.gpu import GpuTarget
from edgepipe.targets.mobile import MobileTarget

TARGETS: dict[str, type[Target]] = {cls.name: cls for cls in (CpuTarget, MobileTarget, GpuTarget)}

__all__ = ["TARGETS", "Emitted", "Target", "TargetContext", "Variant"]
