"""genai_config.json: what onnxruntime-genai needs to load and run the artifact folder as is."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def genai_config(config: Any, tokenizer: Any, geometry: dict[str, int], filename: str, inputs: list[str],
                 eos: list[int], context_length: int | None = None, share_buffer: bool = False) -> dict[str, Any]:
    """The config onnxruntime-genai's builder writes for a decoder (names follow ``graph.PAST``/``PRESENT``).

    ``share_buffer``: past and present KV share one max-length buffer (GroupQueryAttention graphs, as the builder's):
    without it onnxruntime-genai copies the cache every step (measured 0.86x the builder's decode tokens/s).
    """
    context = int(context_length or getattr(config, "max_position_embeddings", 2048))
    names = {"input_ids": "input_ids", "attention_mask": "attention_mask",
             "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    if "position_ids" in inputs:
        names["position_ids"] = "position_ids"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    model_type = config.model_type if config.model_type in ("llama", "qwen2", "mistral", "gpt2", "phi", "phi3") else "llama"
    return {
        "model": {
            "bos_token_id": config.bos_token_id if config.bos_token_id is not None else pad,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": geometry["head_size"],
                "hidden_size": geometry["hidden"],
                "inputs": names,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
                "num_attention_heads": geometry["heads"],
                "num_hidden_layers": geometry["layers"],
                "num_key_value_heads": geometry["kv_heads"],
            },
            "eos_token_id": eos if len(eos) > 1 else (eos[0] if eos else pad),
            "pad_token_id": pad,
            "type": model_type,
            "vocab_size": geometry["vocab"],
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": share_buffer, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def write_genai_config(folder: Path, config: dict[str, Any]) -> Path:
    path = folder / "genai_config.json"
    path.write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
    return path


def genai_greedy(folder: Path, prompt: list[int], max_new_tokens: int, cpu: bool = False) -> list[int]:
    """Greedy tokens onnxruntime-genai generates from the artifact folder (as a runtime would load it).

    ``cpu``: drop the config's providers (a gpu folder names cuda) and run on genai's CPU build.
    """
    import numpy as np
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    if cpu:
        config.clear_providers()
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + max_new_tokens, batch_size=1)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray([prompt], dtype=np.int32))
    out: list[int] = []
    while not generator.is_done() and len(out) < max_new_tokens:
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out
