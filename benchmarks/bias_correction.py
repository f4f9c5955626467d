"""Static int8 QDQ with and without empirical bias correction on the zoo's MobileNet-family CNNs (issue #16).

Run (torchvision lives outside the test env, see benchmarks/zoo.py; any venv with this tree's edgepipe and
torchvision 0.28):  PY benchmarks/bias_correction.py [--models mobilenet_v2,...] [--out DIR]
                     [--calibrations minmax,percentile,mse] [--corrections off,on]

Per model: the zoo's --quick recipe (16 calibration / 8 eval photo crops), exported once, the cpu chain's
`cleanup` + `optimize.ort` (basic), then quantize.static with MinMax, percentile 99.999 (or mse) calibration,
each with bias correction off and on; the cosine is the build's own evaluator against the float reference. Only bias
values change, so the int8 graph (and its speed) is the same either way.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["mobilenet_v2", "mnasnet0_5", "efficientnet_b0", "lraspp", "deeplabv3_mobilenet", "mobilenet_v3_small"]
CALIBRATIONS = {"minmax": {"calibration": "minmax"},
                "percentile": {"calibration": "percentile", "extra_options": {"CalibPercentile": 99.999}},
                "mse": {"calibration": "mse"}}


def zoo():
    spec = importlib.util.spec_from_file_location("zoo", ROOT / "benchmarks" / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(name: str, out: Path, calibrations: list[str], corrections: list[bool]) -> dict[str, float]:
    from edgepipe.passes import PassContext
    from edgepipe.passes.base import load
    from edgepipe.pipeline.build import prepare, run_passes
    from edgepipe.recipe import load_recipe
    from edgepipe.sources.accuracy import resolve_metric
    from edgepipe.targets import TARGETS
    from edgepipe.targets.base import TargetContext

    z = zoo()
    recipe = load_recipe(z.vision_recipe(out / name, name, z.VISION[name], True, ["cpu"]))
    scores = {}
    with prepare(recipe, out / "built", ["cpu"], True) as ctx:
        target = TARGETS["cpu"]()
        tctx = TargetContext(recipe, recipe.targets["cpu"], True, {})
        acc = target.accuracy(tctx)
        evaluate = ctx.evals.evaluator(acc, resolve_metric(acc.metric, recipe.base_dir), ["CPUExecutionProvider"], ctx.work / "cand")
        pctx = PassContext(workdir=ctx.work / "passes", calibration=ctx.calibration, evaluate=evaluate)
        base, _ = run_passes([{"name": "cleanup"}, {"name": "optimize.ort", "level": "basic"}], pctx, load(ctx.source.onnx_path))
        scores["float"] = evaluate(base)
        for cal in calibrations:
            options = CALIBRATIONS[cal]
            for corrected in corrections:
                start = time.perf_counter()
                model, log = run_passes([{"name": "quantize.static", **options, "bias_correction": corrected}], pctx, base)
                key = cal + ("+BC" if corrected else "")
                scores[key] = evaluate(model)
                print(f"  {name:<20} {key:<14} cosine {scores[key]:.4f}  ({time.perf_counter() - start:.0f}s) "
                      f"{ {k: v for k, v in log[0]['stats'].items() if k.startswith('bias')} }", flush=True)
    return scores


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--out", type=Path, default=Path("/tmp/edgepipe-biascorr"))
    p.add_argument("--calibrations", default="minmax,percentile", help=f"comma list from {', '.join(CALIBRATIONS)}")
    p.add_argument("--corrections", default="off,on", help="bias correction: off, on or both")
    args = p.parse_args()
    calibrations, corrections = args.calibrations.split(","), [c == "on" for c in args.corrections.split(",")]
    if set(calibrations) - set(CALIBRATIONS) or not set(args.corrections.split(",")) <= {"off", "on"}:
        p.error("unknown calibration or correction")
    table = {m: measure(m, args.out, calibrations, corrections) for m in args.models.split(",")}
    keys = list(next(iter(table.values())))
    print("\n| model | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for m, s in table.items():
        print(f"| {m} | " + " | ".join(f"{s[k]:.4f}" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
