"""An ONNX Runtime session on a decoder with a KV cache, as the logits function and Decoder of llm_metrics.

The decoder takes the I/O onnxruntime-genai's model builder writes (and edgepipe's decoder export follows):
``input_ids`` and ``attention_mask`` (batch, total length), optional ``position_ids``, and per layer
``past_key_values.N.key|value`` (batch, kv_heads, past_length, head_size) in, ``logits`` (batch, sequence, vocab)
and ``present.N.key|value`` out. An empty past (length 0) is a prefill.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np

from edgepipe.core.errors import BadInput
from edgepipe.core.runtime import ORT_DTYPES, Runner

logger = logging.getLogger(__name__)

CACHE_NAME = re.compile(r"(\d+)\.(key|value)$")


def _head_size(path: Path, shape: list) -> int:
    if isinstance(shape[-1], int):
        return shape[-1]
    config = path.parent / "genai_config.json"  # the builder leaves the head size symbolic ('kv_cache_dim')
    if config.exists():
        return int(json.loads(config.read_text())["model"]["decoder"]["head_size"])
    raise BadInput(f"{path}: the head size of the KV cache is not fixed in the model and there is no genai_config.json "
                   "beside it; give head_size")


class OrtCausalLM:
    """ORT session on a KV-cache decoder: ``logits(ids)`` (teacher forcing, empty past) and ``decoder()``."""

    def __init__(self, path: str | Path, threads: int | None = None, head_size: int | None = None) -> None:
        path = Path(path)
        self.runner = Runner(path, threads=threads)
        self.session = self.runner.session
        inputs = {i.name: i for i in self.session.get_inputs()}
        for required in ("input_ids", "attention_mask"):
            if required not in inputs:
                raise BadInput(f"{path}: not a decoder with a KV cache (no {required!r} input; inputs: {sorted(inputs)})")
        self.past = {CACHE_NAME.search(n).groups(): n for n in inputs if n.startswith("past") and CACHE_NAME.search(n)}
        outputs = [o.name for o in self.session.get_outputs()]
        self.present = {CACHE_NAME.search(n).groups(): n for n in outputs if n.startswith("present") and CACHE_NAME.search(n)}
        if set(self.past) != set(self.present) or "logits" not in outputs:
            raise BadInput(f"{path}: past inputs and present outputs do not pair up (or no 'logits' output)")
        self.output_names = ["logits"] + [self.present[k] for k in sorted(self.present)]
        self.position_ids = "position_ids" in inputs
        if self.past:
            meta = inputs[next(iter(self.past.values()))]
            self.kv_heads = int(meta.shape[1])
            self.head_size = head_size or _head_size(path, meta.shape)
            self.kv_dtype = ORT_DTYPES.get(meta.type, np.float32)

    def run(self, ids: np.ndarray, past: dict[tuple[str, str], np.ndarray] | None = None,
            ) -> tuple[np.ndarray, dict[tuple[str, str], np.ndarray]]:
        """One call: ids (batch, T) after ``past`` (None: empty) -> logits (batch, T, vocab), the new cache."""
        ids = np.asarray(ids, dtype=np.int64)
        batch, length = ids.shape
        if past is None:
            empty = np.zeros((batch, getattr(self, "kv_heads", 0), 0, getattr(self, "head_size", 0)),
                             dtype=getattr(self, "kv_dtype", np.float32))
            past = {k: empty for k in self.past}
        past_length = next(iter(past.values())).shape[2] if past else 0
        feed = {"input_ids": ids, "attention_mask": np.ones((batch, past_length + length), dtype=np.int64)}
        if self.position_ids:
            feed["position_ids"] = np.broadcast_to(np.arange(past_length, past_length + length), ids.shape).copy()
        feed.update({self.past[k]: v for k, v in past.items()})
        logits, *cache = self.session.run(self.output_names, feed)
        return logits, dict(zip(sorted(self.present), cache, strict=True))

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Teacher-forced next-token logits (T, vocab) of one sequence (T,): llm_metrics' logits function."""
        return self.run(np.asarray(ids).reshape(1, -1))[0][0]

    def decoder(self) -> OrtDecoder:
        return OrtDecoder(self)


class OrtDecoder:
    """llm_metrics.Decoder over OrtCausalLM: a prefill, then one token per call on the growing KV cache."""

    def __init__(self, model: OrtCausalLM) -> None:
        self.model = model
        self.cache: dict[tuple[str, str], np.ndarray] | None = None

    def start(self, prompt: np.ndarray) -> np.ndarray:
        logits, self.cache = self.model.run(np.asarray(prompt).reshape(1, -1))
        return logits[0, -1]

    def step(self, token: int) -> np.ndarray:
        logits, self.cache = self.model.run(np.array([[token]], dtype=np.int64), self.cache)
        return logits[0, -1]
