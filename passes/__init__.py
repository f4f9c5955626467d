"""Pass registry: recipe names (``family.kind``) to pass classes."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import ValidationError

from edgepipe.core.errors import BadInput, one_line
from edgepipe.passes.autoquant import QuantizeAuto
from edgepipe.passes.base import EdgepipePass, PassContext, StatsResult, model_stats
from edgepipe.passes.cleanup import Cleanup
from edgepipe.passes.fp16 import Fp16
from edgepipe.passes.fuse import FuseTransformer
from edgepipe.passes.int4 import QuantizeInt4
from edgepipe.passes.optimize import OrtOptimize
from edgepipe.passes.prune import PruneMagnitude
from edgepipe.passes.prune_structured import PruneStructured
from edgepipe.passes.quantize import QuantizeDynamic, QuantizeStatic
from edgepipe.passes.shapes import FixShapes
from edgepipe.passes.share import ShareCluster, ShareDedupe
from edgepipe.passes.smooth import SmoothQuant
from edgepipe.passes.tensorrt import QuantizeTensorRt
from edgepipe.passes.unfuse import UnfuseSkipLayerNorm

PASSES: dict[str, type[EdgepipePass]] = {
    cls.name: cls
    for cls in (
        Cleanup, OrtOptimize, QuantizeDynamic, QuantizeStatic, Fp16, FixShapes, QuantizeTensorRt,
        FuseTransformer, QuantizeAuto, SmoothQuant,
        ShareDedupe, ShareCluster, PruneMagnitude, PruneStructured, QuantizeInt4,
        UnfuseSkipLayerNorm,
    )
}

__all__ = ["PASSES", "EdgepipePass", "PassContext", "StatsResult", "create", "model_stats", "validate_spec"]


def validate_spec(spec: dict[str, Any]) -> tuple[type[EdgepipePass], Any]:
    """Check a recipe pass entry ``{name: ..., **params}``; return (class, config)."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"each pass needs a name, e.g. {{name: cleanup}} (got {spec!r})")
    name = spec["name"]
    cls = PASSES.get(name)
    if cls is None:
        close = difflib.get_close_matches(str(name), PASSES, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ValueError(f"unknown pass '{name}'; {hint}valid passes: {', '.join(sorted(PASSES))}")
    params = {k: v for k, v in spec.items() if k != "name"}
    try:
        return cls, cls.Config(**params)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            valid = ", ".join(cls.Config.model_fields)
            raise ValueError(f"pass {name}: unknown option '{key}'; valid options: {valid or 'none'}") from None
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise ValueError(f"pass {name}: {key + ': ' if key else ''}{msg}") from None


def create(spec: dict[str, Any], context: PassContext) -> EdgepipePass:
    """Instantiate a pass from its recipe entry."""
    try:
        cls, config = validate_spec(spec)
    except ValueError as exc:
        raise BadInput(one_line(str(exc))) from None
    return cls(config, context)
