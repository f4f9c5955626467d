"""Rebuilds calibration.txt, eval.txt and test.txt: paragraphs of real English prose that ship offline.

One paragraph per line (45-170 words, about 60-250 SmolLM2 tokens), taken from, in this order of preference:
the Python Language Reference (pydoc_data.topics), the project descriptions (README long_description) of the
Python packages installed here, scikit-learn's dataset descriptions, and then docstrings of standard-library
modules, classes and functions to fill up. Paragraphs that look like code, markup, grammar or lists are dropped.

calibration.txt and eval.txt are what a build may read; test.txt is held out for benchmarks/llm_vs_genai.py, so the
perplexity it reports was not tuned on. prompts.txt is written by hand (short completion and chat-style prompts).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import random
import re
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPLITS = (("calibration.txt", 32), ("eval.txt", 32), ("test.txt", 64))
# code, markup, links and identifiers: a paragraph with any of these is not prose
NOT_PROSE = re.compile(r"[{}\[\]=<>|`#\\$%^~@]|::|\.\.\.|>>>|\w\(|\*\*|https?:|www\.|_\w|\w_")
SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"}


def paragraphs(text: str, low: int = 45, high: int = 170) -> list[str]:
    """The prose paragraphs of a text: blank-line separated, not indented, not a list item, low..high words."""
    out = []
    for block in re.split(r"\n\s*\n", inspect.cleandoc(text)):
        if block.startswith((" ", "\t")) or block.lstrip().startswith(("-", "*", "+", "1.", ":", "..")):
            continue
        p = re.sub(r"\s+", " ", block).strip()
        if low <= len(p.split()) <= high and p[0].isupper() and p[-1] in ".!?" and not NOT_PROSE.search(p):
            out.append(p)
    return out


def _reference() -> list[str]:
    import pydoc_data.topics  # the Python Language Reference (PSF License)

    return [p for key in sorted(pydoc_data.topics.topics) for p in paragraphs(pydoc_data.topics.topics[key])]


def _readmes() -> list[str]:
    found = []
    for dist in sorted(importlib.metadata.distributions(), key=lambda d: d.metadata["Name"].lower()):
        description = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        found += paragraphs(str(description))
    return found


def _sklearn() -> list[str]:
    import sklearn.datasets  # dataset descriptions (BSD-3-Clause)

    descr = Path(sklearn.datasets.__file__).parent / "descr"
    return [p for path in sorted(descr.glob("*.rst")) for p in paragraphs(path.read_text(encoding="utf-8"))]


def _docstrings() -> list[str]:
    docs: list[str] = []
    with warnings.catch_warnings():  # deprecated modules and attributes warn when touched
        warnings.simplefilter("ignore")
        for name in sorted(sys.stdlib_module_names):
            if name.startswith("_") or name in SKIP_MODULES:
                continue
            try:
                module = importlib.import_module(name)
            except Exception:  # platform-specific modules (winreg, msvcrt, ...)
                continue
            docs.append(module.__doc__ or "")
            for attr in sorted(a for a in dir(module) if not a.startswith("_")):
                obj = getattr(module, attr, None)
                if inspect.getmodule(obj) is not module:
                    continue
                docs.append(obj.__doc__ or "")
                if inspect.isclass(obj):
                    docs += [getattr(v, "__doc__", "") or "" for k, v in sorted(vars(obj).items()) if not k.startswith("_")]
    return [p for doc in docs if isinstance(doc, str) for p in paragraphs(doc)]


def collect(total: int) -> list[tuple[str, str]]:
    """(source, paragraph) pairs, deduplicated: every prose paragraph first, docstrings filling up to total."""
    prose = [("python-reference", p) for p in _reference()] + [("package-readmes", p) for p in _readmes()]
    prose += [("sklearn-descr", p) for p in _sklearn()]
    fill = [("stdlib-docstrings", p) for p in _docstrings()]
    random.Random(0).shuffle(fill)
    seen: set[str] = set()
    chosen = []
    for source, p in prose + fill:
        if p.lower() not in seen and len(chosen) < total:
            seen.add(p.lower())
            chosen.append((source, p))
    if len(chosen) < total:
        raise SystemExit(f"only {len(chosen)} prose paragraphs found, {total} needed")
    random.Random(0).shuffle(chosen)
    return chosen


def main() -> None:
    pairs = collect(sum(n for _, n in SPLITS))
    header = (
        "# Paragraphs of real English prose, one per line, extracted by make_text.py from text that ships offline:\n"
        "# the Python Language Reference (pydoc_data.topics) and standard-library docstrings (Python Software\n"
        "# Foundation License), the README descriptions of installed Python packages (each under its own license),\n"
        "# and scikit-learn's dataset descriptions (BSD-3-Clause).\n"
    )
    start = 0
    for name, n in SPLITS:
        chunk = pairs[start : start + n]
        start += n
        (HERE / name).write_text(header + "".join(p + "\n" for _, p in chunk), encoding="utf-8")
        counts = {s: sum(src == s for src, _ in chunk) for s in sorted({src for src, _ in chunk})}
        print(f"{name}: {len(chunk)} paragraphs {counts}")


if __name__ == "__main__":
    main()
