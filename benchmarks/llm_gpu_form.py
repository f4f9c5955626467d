"""edgepipe's decoder gpu folder vs onnxruntime-genai's builder `-e cuda` output, structure side by side.

Usage: .venv/bin/python benchmarks/llm_gpu_form.py --edgepipe OUT/smollm2-135m/gpu [--hf HF_FOLDER] [--work DIR]
       [--texts N --prompts P]

Builds the builder's `-p fp16 -e cuda` and `-p int4 -e cuda` folders from the same weights (the HF folder that
benchmarks/llm_vs_genai.py dequantizes from the GGUF; its venv, since the builder needs transformers 5.x) and
prints, per form, what each graph is made of: op histogram, I/O dtypes, initializer dtypes, MatMulNBits
attributes and scale dtype, genai_config's provider options and KV buffer sharing. With --texts, also both int4
models' accuracy vs PyTorch on models/smollm2/test.txt (perplexity, top-1, greedy match on P prompts), run on ORT's
CPU provider (llm_vs_genai.accuracy). Nothing here runs CUDA.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
import tempfile
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llm_vs_genai import CACHE, DATA, TorchLM, accuracy, genai_python, hf_folder, lines, run  # noqa: E402

logger = logging.getLogger("llm_gpu_form")
IO = ("input_ids", "attention_mask", "past_key_values.0.key", "logits", "present.0.key")


def describe(model: Path) -> dict:
    graph = onnx.load(str(model), load_external_data=False).graph
    inits = {i.name: i for i in graph.initializer}
    name = onnx.TensorProto.DataType.Name
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    attrs = collections.Counter(tuple(sorted((a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute
                                             if a.name in ("bits", "block_size", "accuracy_level"))) for n in nbits)
    return {
        "ops": dict(sorted(collections.Counter(n.op_type for n in graph.node).items())),
        "io": {v.name: name(v.type.tensor_type.elem_type) for v in [*graph.input, *graph.output] if v.name in IO},
        "initializers": dict(sorted(collections.Counter(name(i.data_type) for i in graph.initializer).items())),
        "matmulnbits": {str(dict(k)): v for k, v in attrs.items()},
        "scales": dict(collections.Counter(name(inits[n.input[2]].data_type) for n in nbits if n.input[2] in inits)),
    }


def genai(folder: Path) -> dict:
    config = json.loads((folder / "genai_config.json").read_text())
    return {"filename": config["model"]["decoder"]["filename"],
            "provider_options": config["model"]["decoder"]["session_options"]["provider_options"],
            "past_present_share_buffer": config["search"]["past_present_share_buffer"]}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edgepipe", required=True, help="an edgepipe decoder gpu folder")
    parser.add_argument("--hf", help="the float HF folder (default: the one llm_vs_genai.py caches)")
    parser.add_argument("--work", help="where the builder writes (default: a temporary folder)")
    parser.add_argument("--texts", type=int, default=0, help="test.txt paragraphs to score both int4 models on (0: none)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts.txt prompts for greedy match (with --texts)")
    args = parser.parse_args()
    ours = Path(args.edgepipe)
    hf = Path(args.hf) if args.hf else hf_folder(CACHE / "smollm2" / "hf")
    work = Path(args.work or tempfile.mkdtemp(prefix="llm-gpu-form-"))
    work.mkdir(parents=True, exist_ok=True)
    python = genai_python()
    rows = {}
    for precision, mine in (("fp16", "model.onnx"), ("int4", "model.int4.onnx")):
        out = work / f"builder-cuda-{precision}"
        if not (out / "genai_config.json").exists():
            logger.info("building %s: onnxruntime_genai.models.builder -p %s -e cuda", out, precision)
            run([str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p", precision,
                 "-e", "cuda", "-c", str(work / "builder-cache")], work / f"builder-{precision}.log")
        rows[precision] = {"builder": describe(out / "model.onnx"), "edgepipe": describe(ours / mine)}
        rows[precision]["builder"]["genai"] = genai(out)
    rows["edgepipe genai_config"] = genai(ours)
    if args.texts:
        rows["int4 accuracy on ORT CPU"] = int4_accuracy(hf, {"builder -p int4 -e cuda": work / "builder-cuda-int4" / "model.onnx",
                                                               "edgepipe gpu int4": ours / "model.int4.onnx"}, args.texts, args.prompts)
    print(json.dumps(rows, indent=1))


def int4_accuracy(hf: Path, models: dict[str, Path], texts: int, prompts: int) -> dict:
    import numpy as np
    from transformers import AutoTokenizer

    from edgepipe.pipeline.decoder.ortlm import OrtCausalLM

    tok = AutoTokenizer.from_pretrained(hf)
    encode = lambda s: np.asarray(tok(s, add_special_tokens=False).input_ids, dtype=np.int64)  # noqa: E731
    sessions = {name: OrtCausalLM(path, threads=2) for name, path in models.items()}
    acc = accuracy(TorchLM(hf, 2), sessions, [encode(s) for s in lines(DATA / "test.txt")][:texts],
                   [encode(s) for s in lines(DATA / "prompts.txt")][:prompts], 32)
    return {name: {k: v for k, v in row.items() if k != "greedy"} for name, row in acc.items()}


if __name__ == "__main__":
    main()
