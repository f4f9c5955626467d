"""Capped artifacts loaded by the onnxruntime release they were capped for (not only by today's).

For each old release: a throwaway venv with that onnxruntime from PyPI, the digits and MiniLM artifacts
built with ``runtime: {onnxruntime: "X.Y"}``, and each model file run in the old release on its own golden
inputs, compared with the golden outputs under the manifest's tolerances (what ``edgepipe verify`` does).
Everything lives in one temp folder that is removed at the end.

    .venv/bin/python benchmarks/runtime_caps.py                 # 1.17.3 and 1.15.1 (oldest for Python 3.11)
    .venv/bin/python benchmarks/runtime_caps.py --releases 1.17.3 --skip-minilm
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EDGEPIPE = [sys.executable, "-m", "edgepipe"]

# Runs inside the old release's venv: no edgepipe there, only onnxruntime and numpy.
CHILD = r'''
import json, sys
from pathlib import Path
import numpy as np
import onnxruntime as ort

folder = Path(sys.argv[1])
manifest = json.loads((folder / "manifest.json").read_text())
results = []
for entry in manifest.get("models") or [manifest]:
    golden = entry["golden"]
    with np.load(folder / golden["file"], allow_pickle=False) as npz:
        inputs = {k[6:]: npz[k] for k in npz.files if k.startswith("input/")}
        expected = {k[9:]: npz[k] for k in npz.files if k.startswith("expected/")}
        reference = {k[10:]: npz[k] for k in npz.files if k.startswith("reference/")}
    row = {"model": entry["model_file"], "onnxruntime": ort.__version__}
    try:
        session = ort.InferenceSession(str(folder / entry["model_file"]), providers=["CPUExecutionProvider"])
    except Exception as exc:
        results.append({**row, "loaded": False, "error": str(exc).splitlines()[0][:300]})
        continue
    names = [i.name for i in session.get_inputs()]
    fixed = session.get_inputs()[0].shape[0]
    n = len(next(iter(inputs.values())))
    step = fixed if isinstance(fixed, int) and fixed > 0 else n
    outs = [session.run(None, {k: inputs[k][i:i + step] for k in names}) for i in range(0, n, step)]
    got = dict(zip([o.name for o in session.get_outputs()], [np.concatenate(parts) for parts in zip(*outs)]))
    worst, passed, cosine = 0.0, True, 1.0
    for name, want in expected.items():
        diff = np.abs(got[name].astype(np.float64) - want.astype(np.float64))
        rel = diff / np.maximum(np.abs(want.astype(np.float64)), 1e-12)
        passed &= not bool(((diff > golden["atol"]) & (rel > golden["rtol"])).any()) and bool(np.isfinite(got[name]).all())
        worst = max(worst, float(diff.max()))
        if name in reference:  # how far from the original model, per sample (the accuracy budget's view)
            a = got[name].reshape(len(got[name]), -1).astype(np.float64)
            b = reference[name].reshape(len(a), -1).astype(np.float64)
            cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
            cosine = min(cosine, float(cos.min()))
    results.append({**row, "loaded": True, "golden_passed": passed, "max_abs_diff": worst, "atol": golden["atol"],
                    "min_cosine_to_reference": round(cosine, 5)})
print(json.dumps(results))
'''


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc


def make_venv(work: Path, release: str) -> Path:
    """A venv with onnxruntime==release (and a numpy it was built against)."""
    venv = work / f"ort-{release}"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", f"onnxruntime=={release}", "numpy<2"])
    return python


def _recipe(work: Path, model: str, targets: dict, tag: str) -> Path:
    """The bundled recipe with its targets replaced, in a folder of its own that links the recipe's files."""
    src = ROOT / "models" / model
    folder = work / f"{model}-{tag}"
    folder.mkdir()
    for f in src.iterdir():
        if f.name != "recipe.yaml":
            (folder / f.name).symlink_to(f)
    data = yaml.safe_load((src / "recipe.yaml").read_text())
    old = data["targets"] if isinstance(data["targets"], dict) else {t: {} for t in data["targets"]}
    data["targets"] = {t: {**(old.get(t) or {}), **spec} for t, spec in targets.items()}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return folder / "recipe.yaml"


def build(work: Path, model: str, targets: list[str], minor: str) -> dict[str, Path]:
    recipe = _recipe(work, model, {t: {"runtime": {"onnxruntime": minor}} for t in targets}, minor)
    out = work / f"out-{model}-{minor}"
    start = time.perf_counter()
    _run([*EDGEPIPE, "build", str(recipe), "-o", str(out), "-q"], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    name = yaml.safe_load(recipe.read_text())["name"]
    print(f"  built {model} {targets} capped for {minor} in {time.perf_counter() - start:.0f} s", flush=True)
    return {t: out / name / t for t in targets}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--releases", default="1.17.3,1.15.1", help="onnxruntime releases (pip-installable here)")
    parser.add_argument("--skip-minilm", action="store_true")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still removes the temp folder and its builds
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgepipe-runtime-caps-") as tmp:
        work = Path(tmp)
        (work / "child.py").write_text(CHILD)
        for release in args.releases.split(","):
            minor = ".".join(release.split(".")[:2])
            print(f"onnxruntime {release}: venv", flush=True)
            python = make_venv(work, release)
            # mobile (.ort v6) needs >= 1.16; gpu and cpu are ONNX files
            digits_targets = ["cpu", "gpu"] + (["mobile"] if tuple(map(int, minor.split("."))) >= (1, 16) else [])
            artifacts = {f"digits/{t}": p for t, p in build(work, "digits", digits_targets, minor).items()}
            if not args.skip_minilm:
                artifacts |= {f"minilm/{t}": p for t, p in build(work, "minilm", ["cpu"], minor).items()}
            for label, folder in artifacts.items():
                manifest = json.loads((folder / "manifest.json").read_text())
                capped = manifest["runtime"].get("requested", {})
                runs = [python, sys.executable]  # the old release, and today's side by side
                for r in (r for py in runs for r in json.loads(_run([str(py), str(work / "child.py"), str(folder)]).stdout)):
                    rows.append({"artifact": label, "capped_for": minor, "opset": capped.get("opset"),
                                 "ir_version": capped.get("ir_version"), **r})
                    print("  " + json.dumps(rows[-1]), flush=True)
    print("\n| artifact | model file | capped for | opset / IR | loaded by | loads | golden | max abs diff (atol) | min cosine to fp32 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        golden = "n/a" if not r["loaded"] else ("pass" if r["golden_passed"] else "FAIL")
        diff = f"{r['max_abs_diff']:.2g} ({r['atol']:.2g})" if r["loaded"] else r["error"]
        print(f"| {r['artifact']} | {r['model']} | {r['capped_for']} | {r['opset']} / {r['ir_version']} | "
              f"{r['onnxruntime']} | {'yes' if r['loaded'] else 'NO'} | {golden} | {diff} | {r.get('min_cosine_to_reference', '')} |")
    return 0 if all(r["loaded"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
