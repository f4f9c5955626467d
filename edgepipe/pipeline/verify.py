"""edgepipe verify: hashes, then golden I/O on the artifact's own runtime."""

from __future__ import annotations

import dataclasses
import time
import zipfile
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from edgepipe.core.artifact import MANIFEST, hash_tree, load_golden, manifest_digest, read_manifest
from edgepipe.core.manifest import Manifest, ModelEntry
from edgepipe.core.runtime import Runner
from edgepipe.sources.accuracy import compare


@dataclasses.dataclass
class Check:
    name: str
    passed: bool
    detail: str
    seconds: float = 0.0


def verify(folder: Path, trust: Any = None) -> list[Check]:
    """All checks, in order; golden I/O runs only when every hash (and the signature, with ``trust``) matches.

    ``trust``: a verifying config from ``edgepipe.core.sign.verifier`` (a public key or certificate chain).
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    checks = [_check_manifest(manifest), _check_files(folder, manifest["files"])]
    if trust is not None:
        from edgepipe.core.sign import check_signature

        result = check_signature(folder, trust)
        checks.append(Check("signature", result.passed, result.detail))
    if all(c.passed for c in checks):
        checks.extend(_check_golden(folder, Manifest.from_json(manifest)))
    else:
        checks.append(Check("golden", False, "not run: the artifact's files, manifest or signature do not check out"))
    return checks


def _check_manifest(manifest: dict) -> Check:
    ok = manifest.get("digest") == manifest_digest(manifest)
    return Check("manifest", ok, "digest matches" if ok else f"{MANIFEST} was edited after the build (digest mismatch)")


def _check_files(folder: Path, expected: dict[str, str]) -> Check:
    actual = hash_tree(folder)
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    changed = sorted(p for p in set(expected) & set(actual) if expected[p] != actual[p])
    problems = [f"{label}: {', '.join(items)}" for label, items in (("changed", changed), ("missing", missing), ("extra", extra)) if items]
    return Check("files", not problems, "; ".join(problems) or f"{len(actual)} files match their sha256")


def _check_golden(folder: Path, manifest: Manifest) -> list[Check]:
    """Golden I/O for every model the folder ships (``models``), or its one ``model_file``."""
    if manifest.is_decoder:  # a decoder: replay the golden prompts' greedy tokens
        from edgepipe.pipeline.decoder.replay import replay

        return [Check(name, ok, detail) for name, ok, detail in replay(folder, manifest)]
    models = manifest.entries
    checks = []
    for entry in models:
        prefix = f"{entry.model_file}:" if len(models) > 1 else ""
        checks.extend(_check_model(folder, entry, prefix))
    return checks


def _check_model(folder: Path, entry: ModelEntry, prefix: str) -> list[Check]:
    golden = entry.golden
    start = time.perf_counter()
    runner = Runner(folder / entry.model_file, providers=entry.runtime.providers, session_config=entry.runtime.session_config)
    name = golden.file
    try:
        inputs, expected, _ = load_golden(folder / name)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:  # pickled or corrupt: never unpickled, never trusted
        return [Check("golden", False, f"{name} is unreadable without unpickling or corrupt: {exc}")]
    got = runner.run_samples(inputs)
    checks = []
    for name, want in expected.items():
        cmp = compare(got[name], want, golden.atol, golden.rtol)
        detail = f"max abs {cmp['max_abs']:.3g}, max rel {cmp['max_rel']:.3g} (atol {golden.get('atol')}, rtol {golden.get('rtol')}) on {runner.providers[0]}"
        checks.append(Check(f"golden:{prefix}{name}", bool(cmp["passed"]), detail, time.perf_counter() - start))
    return checks


def junit_xml(folder: Path, checks: list[Check]) -> str:
    failures = sum(not c.passed for c in checks)
    cases = []
    for c in checks:
        body = "" if c.passed else f"<failure message={quoteattr(c.detail)}>{escape(c.detail)}</failure>"
        cases.append(f'  <testcase classname={quoteattr("edgepipe.pipeline.verify")} name={quoteattr(c.name)} time="{c.seconds:.3f}">{body}</testcase>')
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<testsuite name={quoteattr(f'edgepipe verify {folder}')} tests=\"{len(checks)}\" failures=\"{failures}\">\n"
        + "\n".join(cases)
        + "\n</testsuite>\n"
    )
