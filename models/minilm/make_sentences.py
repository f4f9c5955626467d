"""Rebuilds calibration.txt, eval.txt and test.txt: real English prose that ships with Python and scikit-learn.

calibration.txt and eval.txt are what the build sees (quantize.auto decides on eval.txt); test.txt is held out
for benchmarks/minilm_vs_optimum.py, so the accuracy it reports was not tuned on.
"""

from __future__ import annotations

import importlib
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOC_MODULES = (
    "argparse", "asyncio", "calendar", "collections", "csv", "datetime", "decimal", "difflib", "email.message",
    "fractions", "functools", "heapq", "http.client", "inspect", "itertools", "json", "logging", "os", "pathlib",
    "pickle", "random", "shutil", "socket", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "turtle", "unittest", "urllib.request", "zipfile",
)
WORD = re.compile(r"^[A-Za-z][A-Za-z ,;:'\-]*[A-Za-z][.?!]$")


def _sentences(text: str) -> list[str]:
    text = re.sub(r"\s+", " ", text)
    out = []
    for s in re.split(r"(?<=[.?!])\s+(?=[A-Z])", text):
        s = s.strip()
        if WORD.match(s) and "--" not in s and 6 <= len(s.split()) <= 40:
            out.append(s)
    return out


def collect() -> list[tuple[str, str]]:
    """(source, sentence) pairs, deduplicated, in a fixed order."""
    import pydoc_data.topics

    import sklearn.datasets

    found: list[tuple[str, str]] = []
    for key in sorted(pydoc_data.topics.topics):  # the Python Language Reference (PSF License)
        found += [("python-reference", s) for s in _sentences(pydoc_data.topics.topics[key])]
    for name in DOC_MODULES:  # docstrings of standard-library modules and their public functions (PSF License)
        module = importlib.import_module(name)
        docs = [module.__doc__ or ""] + [getattr(module, a).__doc__ or "" for a in sorted(dir(module)) if not a.startswith("_")]
        found += [("python-docstrings", s) for doc in docs if isinstance(doc, str) for s in _sentences(doc)]
    descr = Path(sklearn.datasets.__file__).parent / "descr"  # scikit-learn dataset descriptions (BSD-3-Clause)
    for path in sorted(descr.glob("*.rst")):
        found += [("sklearn-descr", s) for s in _sentences(path.read_text(encoding="utf-8"))]
    seen: set[str] = set()
    unique = []
    for source, s in found:
        if s.lower() not in seen:
            seen.add(s.lower())
            unique.append((source, s))
    return unique


def main(per_file: int = 256) -> None:
    pairs = collect()
    random.Random(0).shuffle(pairs)
    header = (
        "# Real English sentences, one per line, extracted by make_sentences.py from text that ships offline:\n"
        "# the Python Language Reference (pydoc_data.topics) and standard-library docstrings (both under the\n"
        "# Python Software Foundation License), and\n"
        "# scikit-learn's dataset descriptions (sklearn/datasets/descr/*.rst, BSD-3-Clause).\n"
    )
    splits = ("calibration.txt", "eval.txt", "test.txt")
    for i, name in enumerate(splits):
        chunk = pairs[i * per_file : (i + 1) * per_file]
        (HERE / name).write_text(header + "".join(s + "\n" for _, s in chunk), encoding="utf-8")
        print(f"{name}: {len(chunk)} sentences ({sum(src == 'sklearn-descr' for src, _ in chunk)} from scikit-learn)")


if __name__ == "__main__":
    main()
