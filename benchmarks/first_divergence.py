"""Which nodes of an artifact compute differently in an older onnxruntime release than in today's.

Every node output is exposed, the golden inputs run with ORT's graph optimizations off (the graph exactly as
written) in a throwaway venv with the old release and in today's, and the nodes whose inputs are bit-identical
in both but whose outputs are not are listed: where the releases' kernels differ, before any propagation.
Then the final outputs under each optimization level, side by side.

    .venv/bin/python benchmarks/first_divergence.py OUT/minilm/cpu --release 1.17.3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

# Runs in both interpreters: every exposed tensor (optimizations off), and the outputs per optimization level.
CHILD = r'''
import json, sys
import numpy as np, onnxruntime as ort
folder, exposed, out = sys.argv[1:4]
golden = json.load(open(folder + "/manifest.json"))["golden"]
with np.load(folder + "/" + golden["file"]) as npz:
    feed = {k[6:]: npz[k] for k in npz.files if k.startswith("input/")}
def run(model, level):
    so = ort.SessionOptions(); so.graph_optimization_level = level; so.log_severity_level = 3
    s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    return [o.name for o in s.get_outputs()], s.run(None, {i.name: feed[i.name] for i in s.get_inputs()})
names, values = run(exposed, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
levels = {k: getattr(ort.GraphOptimizationLevel, k) for k in ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")}
finals = {k: run(folder + "/model.onnx", v)[1] for k, v in levels.items()}
np.savez(out, **{f"t/{n}": v for n, v in zip(names, values)}, **{f"final/{k}/{i}": v for k, vs in finals.items() for i, v in enumerate(vs)})
print(ort.__version__)
'''


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an artifact folder (model.onnx, manifest.json, golden)")
    parser.add_argument("--release", default="1.17.3")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgepipe-divergence-") as tmp:
        work = Path(tmp)
        venv = work / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q", f"onnxruntime=={args.release}", "numpy<2"],
                       check=True, capture_output=True)
        model = onnx.load(str(args.folder / "model.onnx"))
        have = {o.name for o in model.graph.output}
        model.graph.output.extend(onnx.ValueInfoProto(name=o) for n in model.graph.node for o in n.output if o and o not in have)
        onnx.save(model, str(work / "exposed.onnx"))
        (work / "child.py").write_text(CHILD)
        runs = {}
        for label, python in (("old", venv / "bin/python"), ("new", Path(sys.executable))):
            version = subprocess.run([str(python), str(work / "child.py"), str(args.folder), str(work / "exposed.onnx"),
                                      str(work / f"{label}.npz")], check=True, capture_output=True, text=True).stdout.strip()
            with np.load(work / f"{label}.npz") as npz:
                runs[label] = (version, {k: npz[k] for k in npz.files})
    (old_v, old), (new_v, new) = runs["old"], runs["new"]

    def same(name: str) -> bool:
        key = f"t/{name}"
        return key not in old or np.array_equal(old[key], new[key])

    print(f"nodes whose inputs are identical in {old_v} and {new_v} but whose outputs differ (optimizations off):")
    for node in model.graph.node:
        differ = [o for o in node.output if not same(o)]
        if differ and all(same(i) for i in node.input if i):
            a, b = old[f"t/{differ[0]}"].astype(np.float64), new[f"t/{differ[0]}"].astype(np.float64)
            d = np.abs(a - b)
            print(f"  {node.op_type} {node.name}: max |Δ| {d.max():.3g} (max |value| {np.abs(b).max():.3g}), "
                  f"{int((d > 0).sum())} of {d.size} elements")
    print(f"final outputs, max |Δ| {old_v} vs {new_v} at each level; and vs {new_v} ORT_ENABLE_ALL:")
    for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"):
        keys = sorted(k for k in new if k.startswith(f"final/{level}/"))
        ref = [new[k.replace(level, "ORT_ENABLE_ALL")] for k in keys]
        cross = max(float(np.abs(old[k] - new[k]).max()) for k in keys)
        own = max(float(np.abs(new[k] - r).max()) for k, r in zip(keys, ref, strict=True))
        print(json.dumps({"level": level, "old_vs_new": round(cross, 6), "new_vs_new_all": round(own, 6)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
