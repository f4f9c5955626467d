"""Vision transformers on cpu and mobile: static QDQ int8 (today's default, with the budget fallback) against dynamic int8.

Run:  EDGEPIPE_ZOO_VENV=/tmp/zoo-venv-X .venv/bin/python benchmarks/vit_dynamic.py [--models vit_b_16,swin_t,vit_b_32] [--out DIR]

Each model as benchmarks/zoo.py makes it (torchvision definition, random weights, BatchNorm statistics on photo
crops; `--quick` data: 16 calibration / 8 eval crops; cosine >= 0.98), exported once (the build's own ``prepare``),
then the pass chains from Python, without a full build per variant:

- static: cleanup → optimize.ort basic → quantize.static, through the build's budget fallback (re-calibration, then
  quantize.auto) without the speed check; what it ends with is the int8 model of both targets (their static steps
  are the same: uint8 activations, int8 per-channel weights); mobile adds shapes.fix.
- dynamic: the text encoders' chains: cpu cleanup → optimize.ort basic → quantize.dynamic (per channel, reduce_range
  on); mobile the same with reduce_range off, then shapes.fix and unfuse.skiplayernorm; through the budget fallback too.

Float models get the same chains without the quantize step. Every model is emitted as the target ships it
(model.onnx; mobile: model.ort) and scored on the eval crops from the emitted file (the build's check); one target's
files are timed interleaved with targets/speed.py's timer (batch 1, 1 thread) ``--rounds`` times; the table takes
each round's ratios (float/int8 per chain, static/dynamic int8) and gives their median, and each model's median ms.
torchvision lives only in the zoo venv: this script re-runs itself there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

STATIC = [{"name": "cleanup"}, {"name": "optimize.ort", "level": "basic"}, {"name": "quantize.static"}]


def dynamic_chain(target: str) -> list[dict]:
    head = [{"name": "cleanup"}, {"name": "optimize.ort", "level": "basic"}]
    if target == "cpu":
        return [*head, {"name": "quantize.dynamic"}]
    return [*head, {"name": "quantize.dynamic", "reduce_range": False}]


def quantize_record(log: list[dict]) -> dict:
    """What the int8 step did: plain metric, re-calibrations, nodes kept float, final metric."""
    entry = next((p for p in log if p["name"].startswith("quantize") or p["name"] == "budget.fallback"), None)
    if entry is None:
        return {}
    stats = entry.get("stats") or {}
    origin = stats.get("fallback_from") or {}
    return {"step": entry["name"], "plain": origin.get("metric", stats.get("initial_metric")),
            "calibrations": origin.get("calibrations"), "kept_float": len(stats.get("kept_float") or []),
            "candidates": len(stats.get("sensitivity") or []), "summary": stats.get("summary")}


def measure(name: str, arch: str, folder: Path, seconds: float, rounds: int, fallback: bool = True) -> list[dict]:
    from zoo import vision_recipe

    from edgepipe.core.fanout import evaluate_batches
    from edgepipe.core.runtime import Runner
    from edgepipe.passes.base import load
    from edgepipe.pipeline.build import TargetStage, _pass_context, prepare, run_passes
    from edgepipe.pipeline.fallback import run_with_fallback
    from edgepipe.pipeline.outputs import measure_every_output
    from edgepipe.recipe import load_recipe
    from edgepipe.sources.accuracy import resolve_metric
    from edgepipe.sources.datashapes import longest_shapes
    from edgepipe.targets import TARGETS, TargetContext
    from edgepipe.targets.encoder import transformer_encoder
    from edgepipe.targets.speed import time_artifacts

    recipe = load_recipe(vision_recipe(folder / "recipe", name, arch, True, ["cpu", "mobile"]))
    rows = []
    t0 = time.perf_counter()
    with prepare(recipe, folder / "out", ["cpu", "mobile"], True) as ctx:
        print(f"{name}: exported in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        source = load(ctx.source.onnx_path)
        ev = ctx.evals
        sample = ev.batches[0][0]
        stages = {}
        for t in ("cpu", "mobile"):
            target = TARGETS[t]()
            spec = recipe.targets[t]
            tctx = TargetContext(recipe, spec, True, longest_shapes(ctx.source.inputs, ev.batches, ctx.calibration, None), None)
            acc = target.accuracy(tctx)
            stages[t] = TargetStage(ctx, target, tctx, acc, resolve_metric(acc.metric, recipe.base_dir))

        def emit(stage: TargetStage, model, key: str) -> tuple[Path, float]:
            out = folder / "emitted" / stage.target.name / key
            out.mkdir(parents=True, exist_ok=True)
            emitted = stage.target.emit(model, out, stage.tctx)
            path = out / emitted.model_file
            runner = Runner(path, providers=emitted.providers)
            outputs = evaluate_batches(runner, path, ev.batches, emitted.providers, emitted.session_config)
            return path, measure_every_output(stage.accuracy, stage.metric, outputs, ev.reference, ev.labels).value

        # static: one fallback search (the same quantize step on cpu and mobile), scored as the build scores candidates
        t1 = time.perf_counter()
        cpu = stages["cpu"]
        if fallback:
            static_int8, static_log = run_with_fallback("cpu", cpu.tctx.spec, STATIC, _pass_context(cpu, "static"), load(ctx.source.onnx_path), run_passes)
        else:  # plain static int8, whatever its accuracy (a speed comparison)
            static_int8, static_log = run_passes(STATIC, _pass_context(cpu, "static"), load(ctx.source.onnx_path))
        static_s = time.perf_counter() - t1
        base, _ = run_passes(STATIC[:2], _pass_context(cpu, "float"), load(ctx.source.onnx_path))
        print(f"{name}: static chain {static_s:.0f} s: {quantize_record(static_log)}", file=sys.stderr, flush=True)
        for t, stage in stages.items():
            fix = [] if t == "cpu" else [stage.target._fix(stage.tctx)]
            t1 = time.perf_counter()
            chain = [*dynamic_chain(t), *fix, *([{"name": "unfuse.skiplayernorm"}] if t == "mobile" else [])]
            if fallback:
                dyn_int8, dyn_log = run_with_fallback(t, stage.tctx.spec, chain, _pass_context(stage, "dynamic"), load(ctx.source.onnx_path), run_passes)
            else:
                dyn_int8, dyn_log = run_passes(chain, _pass_context(stage, "dynamic"), load(ctx.source.onnx_path))
            dyn_s = time.perf_counter() - t1
            pctx = _pass_context(stage, "emit")
            files = {
                "float": emit(stage, run_passes(fix, pctx, base)[0], "float"),
                "static": emit(stage, run_passes(fix, pctx, static_int8)[0], "static"),
            }
            if t == "mobile":  # the dynamic chain's own float model: shapes fixed and unfused
                files["float_dyn"] = emit(stage, run_passes([*fix, {"name": "unfuse.skiplayernorm"}], pctx, base)[0], "float_dyn")
            files["dynamic"] = emit(stage, dyn_int8, "dynamic")
            keys = list(files)
            timed = [time_artifacts([files[k][0] for k in keys], stage.target, sample, seconds) for _ in range(rounds)]
            ms = {k: float(np.median([r[i] for r in timed])) for i, k in enumerate(keys)}
            float_dyn = ms.get("float_dyn", ms["float"])
            row = {
                "model": name, "target": t, "transformer_encoder": transformer_encoder(source),
                "float_ms": ms["float"], "static_ms": ms["static"], "dynamic_ms": ms["dynamic"], "float_dyn_ms": float_dyn,
                "static_speedup": round(ms["float"] / ms["static"], 2), "dynamic_speedup": round(float_dyn / ms["dynamic"], 2),
                "float_cos": round(files["float"][1], 5), "static_cos": round(files["static"][1], 5), "dynamic_cos": round(files["dynamic"][1], 5),
                "static": quantize_record(static_log), "dynamic": quantize_record(dyn_log),
                "static_chain_s": round(static_s, 1), "dynamic_chain_s": round(dyn_s, 1), "rounds": timed,
                "load": os.getloadavg()[0],
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def retime(out: Path, models: list[str], seconds: float, rounds: int) -> int:
    """The emitted float / static / dynamic files of an earlier run, timed again as ``measure`` times them (interleaved,
    1 thread, on one eval crop); one JSON row per model and target, then the table's timing columns."""
    from edgepipe.targets import TARGETS
    from edgepipe.targets.speed import time_artifacts

    for name in models:
        sample = {"image": np.load(out / name / "recipe" / "eval.npz")["image"][:1]}
        for t in ("cpu", "mobile"):
            folder = out / name / "emitted" / t
            keys = [k for k in ("float", "static", "float_dyn", "dynamic") if (folder / k).is_dir()]
            paths = [next(p for p in (folder / k).iterdir() if p.name in ("model.onnx", "model.ort")) for k in keys]
            timed = [time_artifacts(paths, TARGETS[t](), sample, seconds) for _ in range(rounds)]
            ms = {k: float(np.median([r[i] for r in timed])) for i, k in enumerate(keys)}
            row = {"model": name, "target": t, "rounds": timed, "load": os.getloadavg()[0], **{f"{k}_ms": v for k, v in ms.items()}}
            print(json.dumps({**row, **{f"{k}_ratio": round(v, 3) for k, v in ratios(row).items()}}), flush=True)
    return 0


def ratios(r: dict) -> dict[str, float]:
    """Median over the timing rounds of each round's float/int8 (static, dynamic) and static/dynamic int8 time."""
    keys = ["float", "static", *(["float_dyn"] if len(r["rounds"][0]) == 4 else []), "dynamic"]
    per = [dict(zip(keys, t, strict=True)) for t in r["rounds"]]
    med = lambda xs: float(np.median(xs))  # noqa: E731
    return {"static": med([t["float"] / t["static"] for t in per]),
            "dynamic": med([t.get("float_dyn", t["float"]) / t["dynamic"] for t in per]),
            "static_vs_dynamic": med([t["static"] / t["dynamic"] for t in per])}


def print_table(rows: list[dict]) -> None:
    print("\n| model | target | float ms | static int8 ms | float/static | dynamic int8 ms | float/dynamic | static/dynamic ms | "
          "static cosine (plain → shipped) | dynamic cosine | static kept float | static / dynamic chain s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        s, d, x = r["static"], r["dynamic"], ratios(r)
        fd = f" ({r['float_dyn_ms']:.1f})" if r["float_dyn_ms"] != r["float_ms"] else ""
        print(f"| {r['model']} | {r['target']} | {r['float_ms']:.1f}{fd} | {r['static_ms']:.1f} | {x['static']:.2f}x | "
              f"{r['dynamic_ms']:.1f} | {x['dynamic']:.2f}x | {x['static_vs_dynamic']:.2f} | {_cos(s, r['static_cos'])} | "
              f"{_cos(d, r['dynamic_cos'])} | {s.get('kept_float', 0)} of {s.get('candidates', 0) or '-'} | "
              f"{r['static_chain_s']:.0f} / {r['dynamic_chain_s']:.0f} |")


def _cos(record: dict, shipped: float) -> str:
    """The emitted model's cosine, after plain int8's where the budget fallback changed the step."""
    plain = record.get("plain")
    return f"{shipped:.4f}" if plain is None else f"{plain:.4f} → {shipped:.4f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vit_b_16,swin_t", help="zoo names or torchvision architectures (vit_b_32, maxvit_t)")
    p.add_argument("--out", default="/tmp/edgepipe-vitdyn")
    p.add_argument("--seconds", type=float, default=3.0, help="per timing round (targets/speed.py's timer)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-fallback", action="store_true", help="plain static and dynamic int8, no budget fallback (speed only)")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--table", help="no runs: the table of an earlier run's stdout (one JSON row a line)")
    p.add_argument("--retime", action="store_true", help="no chains: time the files an earlier run emitted under --out again")
    args = p.parse_args()
    if args.table:
        print_table([json.loads(ln) for ln in Path(args.table).read_text().splitlines() if ln.startswith("{")])
        return 0
    if args.retime:
        return retime(Path(args.out), args.models.split(","), args.seconds, args.rounds)
    if not args.inner:
        from zoo import vision_env

        python = vision_env()
        return subprocess.run([str(python), __file__, "--inner", *sys.argv[1:]], env={**os.environ}).returncode
    from zoo import VISION

    rows = []
    for name in args.models.split(","):
        rows += measure(name, VISION.get(name, name), Path(args.out) / name, args.seconds, args.rounds, not args.no_fallback)
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
