"""Import user code named as ``path.py:function`` (relative to a recipe) or ``package.module:function``."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from edgepipe.core.errors import BadInput

# ``torchvision.models:resnet18``: a dotted module path (no slash, no .py) and a function name.
MODULE_REF = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def is_module_ref(ref: str) -> bool:
    """``package.module:function`` (an installed callable), not ``path.py:function``."""
    return bool(MODULE_REF.fullmatch(ref)) and not ref.rpartition(":")[0].endswith(".py")


def split_ref(ref: str, base: Path) -> tuple[Path, str]:
    """Parse ``path.py:function`` into an absolute path and a function name."""
    path_text, sep, func = ref.rpartition(":")
    if not sep or not path_text or not func.isidentifier():
        raise BadInput(f"'{ref}' is not of the form path.py:function or package.module:function")
    path = (base / path_text).resolve()
    if not path.is_file():
        raise BadInput(f"'{ref}': file {path} not found (paths are relative to the recipe)")
    return path, func


@contextlib.contextmanager
def importable(folder: Path) -> Iterator[None]:
    """``folder`` on sys.path while the body runs (the user file's own ``from helper import x``).

    Afterwards the path is gone and so are the modules imported from the folder: two recipes with a
    ``helper.py`` each, built in one process, each get their own (the user module keeps its references).
    """
    entry = str(folder)
    before = set(sys.modules)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)
        for name in set(sys.modules) - before:
            file = getattr(sys.modules[name], "__file__", None) or ""
            if file and Path(file).resolve().is_relative_to(folder):
                del sys.modules[name]


def _from_module(ref: str) -> Callable[..., Any]:
    module_name, _, func = ref.rpartition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        raise BadInput(f"'{ref}': no module named '{missing}'; pip install the package that provides it, or name a file as path.py:function") from None
    except Exception as exc:
        raise BadInput(f"'{ref}': importing {module_name} failed: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise BadInput(f"'{ref}': module {module_name} has no function '{func}'")
    return fn


def load_callable(ref: str, base: Path) -> Callable[..., Any]:
    """Import the module (a file beside the recipe, or an installed module) and return the named function.

    A file's folder is importable while it is imported and while the function runs.
    """
    if is_module_ref(ref):
        return _from_module(ref)
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
            with importable(path.parent):
                spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise BadInput(f"'{ref}': importing {path.name} failed: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, func, None)
    if not callable(fn):
        raise BadInput(f"'{ref}': {path.name} has no function '{func}'")

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with importable(path.parent):  # imports inside the function body resolve beside the file too
            return fn(*args, **kwargs)

    return call
