"""The mobile target's .ort conversion with torch blocked in the converter child vs with torch imported, side by side.

`onnxruntime.tools` imports torch when it is installed, for a helper the converter never calls; the mobile target's
child blocks that import (targets/mobile.py CONVERTER). Both ways are timed in alternation on one model (wall, and
the child's CPU seconds), and the canonical bytes (targets/ortbytes.py) of each way are compared: they must be equal.

Usage: python benchmarks/ort_convert.py [--rounds 5] [--onnx MODEL.onnx]   (default: the digits CNN, exported here)
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from edgepipe.targets import mobile
from edgepipe.targets.ortbytes import canonical_ort

ROOT = Path(__file__).resolve().parents[1]
WAYS = {"torch blocked (shipped)": mobile.CONVERTER,
        "torch imported (as before)": mobile.CONVERTER.replace("sys.modules['torch'] = None; ", "")}


def digits_onnx(folder: Path) -> Path:
    from edgepipe.recipe import load_recipe
    from edgepipe.sources.export import export_torch

    return export_torch(load_recipe(ROOT / "models" / "digits" / "recipe.yaml"), folder, None).onnx_path


def convert(src: Path, converter: str) -> tuple[float, float, bytes]:
    """(wall s, child CPU s, raw .ort bytes) of one conversion of ``src`` the way ``converter`` runs it."""
    work = Path(tempfile.mkdtemp(prefix="ort-convert-"))
    try:
        shutil.copy(src, work / "model.onnx")
        mobile.CONVERTER = converter
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        mobile.convert_to_ort(work / "model.onnx", work / "ort")
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        return wall, cpu, (work / "ort" / "model.ort").read_bytes()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--onnx", type=Path, help="the model to convert (default: the digits CNN)")
    args = parser.parse_args()
    shipped = mobile.CONVERTER
    with tempfile.TemporaryDirectory(prefix="ort-convert-src-") as tmp:
        src = args.onnx or digits_onnx(Path(tmp))
        times: dict[str, list[tuple[float, float]]] = {way: [] for way in WAYS}
        raw: dict[str, set[str]] = {way: set() for way in WAYS}
        canonical: set[str] = set()
        try:
            for _ in range(args.rounds):
                for way, converter in WAYS.items():
                    wall, cpu, data = convert(src, converter)
                    times[way].append((wall, cpu))
                    raw[way].add(hashlib.sha256(data).hexdigest()[:12])
                    canonical.add(hashlib.sha256(canonical_ort(data)).hexdigest()[:12])
        finally:
            mobile.CONVERTER = shipped
    print(f"model: {src.name if args.onnx else 'digits CNN'}, {args.rounds} rounds, ways alternated\n")
    print(f"| {'converter child':<28} | wall p50 s | child CPU p50 s | raw .ort sha256 |")
    print(f"|{'-' * 30}|-----------:|----------------:|-----------------|")
    p50 = {}
    for way in WAYS:
        p50[way] = statistics.median(w for w, _ in times[way])
        cpu = statistics.median(c for _, c in times[way])
        print(f"| {way:<28} | {p50[way]:10.3f} | {cpu:15.3f} | {', '.join(sorted(raw[way]))} |")
    blocked, imported = WAYS
    print(f"\nspeed-up (wall p50): {p50[imported] / p50[blocked]:.2f}x")
    print(f"canonical .ort sha256 over every conversion: {', '.join(sorted(canonical))}"
          f" ({'identical' if len(canonical) == 1 else 'DIFFERENT'})")


if __name__ == "__main__":
    main()
