"""Import user code named as ``path.py:function`` relative to a recipe."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgepipe.core.errors import BadInput


def split_ref(ref: str, base: Path) -> tuple[Path, str]:
    """Parse ``path.py:function`` into an absolute path and a function name."""
    path_text, sep, func = ref.rpartition(":")
    if not sep or not path_text or not func.isidentifier():
        raise BadInput(f"'{ref}' is not of the form path.py:function")
    path = (base / path_text).resolve()
    if not path.is_file():
        raise BadInput(f"'{ref}': file {path} not found (paths are relative to the recipe)")
    return path, func


def load_callable(ref: str, base: Path) -> Callable[..., Any]:
    """Import the module file and return the named function."""
    path, func = split_ref(ref, base)
    name = "edgepipe_user_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise BadInput(f"'{ref}': {path} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise BadInput(f"'{ref}': importing {path.name} failed: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, func, None)
    if not callable(fn):
        raise BadInput(f"'{ref}': {path.name} has no function '{func}'")
    return fn
