"""Local Hugging Face folders: tokenizer-backed text data and a checked ONNX export."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import onnx

from edgepipe.core.errors import BadInput, one_line
from edgepipe.core.logs import muted
from edgepipe.recipe import Recipe
from edgepipe.sources.export import Batch, InputSpecs, Outputs, Source, module_digest, onnx_io, verify_export

TASKS = {"feature-extraction": ("sentence_embedding", "token_embeddings"), "text-classification": ("logits",)}
INPUTS = ("input_ids", "attention_mask")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "merges.txt",
    "sentencepiece.bpe.model", "spiece.model", "config.json", "modules.json", "sentence_bert_config.json",
    "1_Pooling/config.json",
)
DEFAULT_MAX_LENGTH = 128


def hf_folder(recipe: Recipe) -> Path:
    folder = recipe.path(recipe.model.hf or "")
    if not (folder / "config.json").is_file():
        raise BadInput(f"model.hf: {folder} is not a Hugging Face model folder (no config.json)")
    return folder


def _task(recipe: Recipe) -> str:
    task = recipe.model.task or "feature-extraction"
    if task not in TASKS:
        raise BadInput(f"model.task '{task}' is not supported for hf models; use one of {', '.join(TASKS)}")
    return task


def text_encoder(folder: Path, max_length: int | None = None):
    """texts -> {input_ids, attention_mask} (int64), padded to the batch's longest, truncated at max_length."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise BadInput(one_line(f"cannot load the tokenizer from {folder}: {type(exc).__name__}: {exc}")) from None
    length = max_length or DEFAULT_MAX_LENGTH

    def encode(texts: list[str]) -> Batch:
        enc = tokenizer(texts, padding=True, truncation=True, max_length=length, return_tensors="np")
        return {k: np.asarray(enc[k], dtype=np.int64) for k in INPUTS}

    return encode


def _pooling(folder: Path) -> tuple[str, bool]:
    """(pooling mode, L2-normalize) from a sentence-transformers folder; mean pooling, no norm otherwise."""
    mode, normalize = "mean", False
    pooling = folder / "1_Pooling" / "config.json"
    if pooling.is_file():
        cfg = json.loads(pooling.read_text())
        mode = "cls" if cfg.get("pooling_mode_cls_token") else "max" if cfg.get("pooling_mode_max_tokens") else "mean"
    modules = folder / "modules.json"
    if modules.is_file():
        normalize = any(m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text()))
    return mode, normalize


def _wrap(folder: Path, task: str):
    """The HF model plus its task head as one torch module with named tensor outputs."""
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    auto = AutoModel if task == "feature-extraction" else AutoModelForSequenceClassification
    try:
        # eager attention exports the pattern onnxruntime's transformer fusion recognises (SDPA does not)
        model = auto.from_pretrained(str(folder), attn_implementation="eager", local_files_only=True).eval()
    except Exception as exc:
        raise BadInput(one_line(f"cannot load the model from {folder}: {type(exc).__name__}: {exc}")) from None
    mode, normalize = _pooling(folder)

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
            if task == "text-classification":
                return {"logits": out.logits}
            tokens = out.last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            if mode == "cls":
                pooled = tokens[:, 0]
            elif mode == "max":
                pooled = (tokens + (mask - 1.0) * 1e9).max(dim=1).values
            else:  # mean over real tokens only (sentence-transformers' Pooling)
                pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            return {"sentence_embedding": pooled, "token_embeddings": tokens}

    return Wrapped().eval()


def export_hf(recipe: Recipe, workdir: Path, real: Batch | None) -> Source:
    """Export a local HF folder (task head included) with dynamic batch and sequence, checked against PyTorch."""
    import torch

    folder, task = hf_folder(recipe), _task(recipe)
    outputs = list(recipe.outputs or TASKS[task][:1])
    unknown = [o for o in outputs if o not in TASKS[task]]
    if unknown:
        raise BadInput(f"outputs {unknown} are not produced by task {task}; choose from {list(TASKS[task])}")
    if recipe.inputs and sorted(i.name for i in recipe.inputs) != sorted(INPUTS):
        raise BadInput(f"recipe inputs {[i.name for i in recipe.inputs]} do not match the hf export's inputs {list(INPUTS)}")
    module = _wrap(folder, task)
    specs: InputSpecs = {n: ("int64", ["batch", "sequence"]) for n in INPUTS}
    if real is None:
        real = text_encoder(folder)(["edgepipe exports a checked model.", "A second, somewhat longer example sentence."])

    def reference(feed: Batch) -> Outputs:
        with torch.no_grad():
            result = module(*[torch.from_numpy(np.ascontiguousarray(feed[n])) for n in INPUTS])
        return {n: result[n].numpy() for n in outputs}

    class Named(torch.nn.Module):  # tuple outputs in the recipe's order for the exporter
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, input_ids, attention_mask):
            result = self.inner(input_ids, attention_mask)
            return tuple(result[n] for n in outputs)

    sizes = {"batch": max(2, min(len(real["input_ids"]), 4)), "sequence": max(2, min(real["input_ids"].shape[1], 64))}
    example = {k: np.ascontiguousarray(real[k][: sizes["batch"], : sizes["sequence"]]) for k in INPUTS}
    path = workdir / "source.onnx"
    # TorchScript export by default: its attention graph fuses (Attention, SkipLayerNorm, BiasGelu) in
    # onnxruntime.transformers; the dynamo export's does not with ORT 1.32.
    dynamo = recipe.model.exporter == "dynamo" and "exporter" in recipe.model.model_fields_set
    try:
        with muted("torch.onnx"), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                Named().eval(),
                tuple(torch.from_numpy(example[n]) for n in INPUTS),
                str(path),
                input_names=list(INPUTS),
                output_names=outputs,
                dynamic_axes={n: {0: "batch", 1: "sequence"} for n in INPUTS},
                opset_version=recipe.model.opset or 17,
                dynamo=dynamo,
                external_data=False,
            )
    except Exception as exc:
        raise BadInput(one_line(f"ONNX export of {folder} failed: {type(exc).__name__}: {exc}")) from None
    onnx.checker.check_model(str(path))
    checks = verify_export(path, reference, specs, real, sizes)
    extra = {f"tokenizer/{name}": folder / name for name in TOKENIZER_FILES if (folder / name).is_file()}
    return Source(path, reference, onnx_io(path)[0], outputs, "hf", module_digest(module), checks, extra)
