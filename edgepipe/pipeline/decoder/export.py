"""A causal LM to one ONNX decoder graph with a KV cache, checked against PyTorch where caches go wrong.

Llama-family models (Llama, Qwen2, Mistral, SmolLM) are written directly as the fused graph
(``graph.build_graph``: GroupQueryAttention with rotary inside, SkipSimplifiedLayerNormalization),
the form onnxruntime-genai's builder writes and ORT's CPU kernels run fastest; other
architectures (GPT-2, Phi, ...) go through optimum-onnx's ``text-generation-with-past`` export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np

from edgepipe.core.errors import BadInput, CheckFailed, one_line
from edgepipe.pipeline.decoder.graph import build_graph, geometry, supports
from edgepipe.pipeline.decoder.runtime import OrtDecoder, TorchDecoder
from edgepipe.pipeline.decoder.source import CausalLM, save_tokenizer

logger = logging.getLogger(__name__)
RTOL = 1e-4  # max |onnx - torch| relative to max |torch logits|: float32 export noise is ~1e-6


@dataclasses.dataclass
class Exported:
    path: Path
    backend: str  # fused | optimum
    geometry: dict[str, int]
    checks: list[dict]


def export_decoder(lm: CausalLM, workdir: Path, sample: np.ndarray) -> Exported:
    """Export ``lm`` to ``workdir/source/model.onnx`` and check it at past lengths 0, 1 and many."""
    path = workdir / "source" / "model.onnx"
    if supports(lm.model.config) is None:
        geo, backend = build_graph(lm.model, path), "fused"
    else:
        logger.info("not a Llama-family model (%s): optimum-onnx export", supports(lm.model.config))
        geo, backend = _optimum(lm, workdir, path), "optimum"
    checks = check_export(path, TorchDecoder(lm.model), sample)
    bad = [c for c in checks if not c["passed"]]
    if bad:
        raise CheckFailed(f"the ONNX decoder disagrees with PyTorch ({bad[0]['case']}: max abs {bad[0]['max_abs']:.3g}, "
                          f"scale {bad[0]['scale']:.3g}); this architecture's export is wrong, please report it")
    return Exported(path, backend, geo, checks)


def _optimum(lm: CausalLM, workdir: Path, path: Path) -> dict[str, int]:
    from optimum.exporters.onnx import main_export

    hf = workdir / "hf"
    lm.model.save_pretrained(str(hf))
    save_tokenizer(lm, hf)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            main_export(str(hf), output=str(path.parent), task="text-generation-with-past", device="cpu")
    except Exception as exc:
        raise BadInput(one_line(f"ONNX export of {lm.origin} (model_type {lm.model.config.model_type}) failed: "
                                f"{type(exc).__name__}: {exc}")) from None
    shutil.rmtree(hf, ignore_errors=True)
    return geometry(lm.model.config)


def _case(name: str, got: np.ndarray, ref: np.ndarray) -> dict:
    err = float(np.abs(got - ref).max())
    scale = float(np.abs(ref).max()) or 1.0
    return {"case": name, "max_abs": err, "scale": scale, "passed": bool(err <= RTOL * max(scale, 1.0)) and bool(np.isfinite(got).all())}


def check_export(path: Path, torch_ref: TorchDecoder, ids: np.ndarray) -> list[dict]:
    """ONNX vs PyTorch logits: prefill (past 0), past 1, past many, prefill + step-by-step decode, batch 2."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    if len(ids) < 4:
        raise BadInput("the export check needs a sample of at least 4 tokens (data.eval or data.calibration text)")
    dec = OrtDecoder(path, threads=None)
    ref = torch_ref.logits(ids)
    row = ids.reshape(1, -1)
    checks = [_case("past 0 (prefill)", dec.run(row, dec.empty_past())[0][0], ref)]
    _, past = dec.run(row[:, :1], dec.empty_past())
    checks.append(_case("past 1", dec.run(row[:, 1:], past)[0][0], ref[1:]))
    n = len(ids) - 1
    _, past = dec.run(row[:, :n], dec.empty_past())
    checks.append(_case(f"past {n}", dec.run(row[:, n:], past)[0][0], ref[n:]))
    half = len(ids) // 2
    logits, past = dec.run(row[:, :half], dec.empty_past())
    steps = [logits[0]]
    for t in range(half, len(ids)):
        logits, past = dec.run(row[:, t:t + 1], past)
        steps.append(logits[0])
    checks.append(_case(f"prefill {half} + {len(ids) - half} decode steps", np.concatenate(steps), ref))
    both = dec.run(np.concatenate([row, row[:, ::-1]]), dec.empty_past(2))[0]
    checks.append(_case("batch 2", both[1], torch_ref.logits(ids[::-1])))
    for c in checks:
        logger.info("export check %s: max abs %.3g (scale %.3g) %s", c["case"], c["max_abs"], c["scale"], "ok" if c["passed"] else "FAILED")
    return checks
