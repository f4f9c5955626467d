"""edgepipe: trained model to validated edge-deployment builds.

``edgepipe.build(recipe, out=..., targets=...)`` and ``edgepipe.verify(path)`` are the Python API; they are
imported on first use, so ``import edgepipe`` stays cheap.
"""

from __future__ import annotations

from typing import Any

from edgepipe.core.version import VERSION as __version__

__all__ = ["__version__", "build", "verify"]


def __getattr__(name: str) -> Any:
    if name in ("build", "verify", "BuildResult", "VerifyResult"):
        from edgepipe import api

        return getattr(api, name)
    raise AttributeError(f"module 'edgepipe' has no attribute {name!r}")
