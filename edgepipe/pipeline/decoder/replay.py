"""verify and bench for a text-generation artifact: replay the golden prompts' greedy tokens; time prefill/decode."""

from __future__ import annotations

import logging
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.core.errors import BadInput
from edgepipe.core.manifest import Manifest, ModelEntry
from edgepipe.pipeline.decoder.bench import bench_decoder
from edgepipe.pipeline.decoder.metrics import greedy, matched
from edgepipe.pipeline.decoder.runtime import OrtDecoder

logger = logging.getLogger(__name__)


def load_prompts(path: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(prompts, greedy tokens) from a decoder golden.npz; never unpickled."""
    with np.load(path, allow_pickle=False) as npz:
        n = sum(1 for k in npz.files if k.startswith("prompt/"))
        return [npz[f"prompt/{i}"] for i in range(n)], [npz[f"tokens/{i}"] for i in range(n)]


def replay(folder: Path, manifest: Manifest, threads: int | None = None) -> list[tuple[str, bool, str]]:
    """(name, passed, detail) per check: every model's greedy tokens on every golden prompt equal the stored ones."""
    entries = manifest.entries  # a gpu folder: the fp16 and the int4 model, each with its golden file
    return [r for entry in entries for r in _replay_one(folder, entry, threads, f"{entry.model_file}:" if len(entries) > 1 else "")]


def _replay_one(folder: Path, entry: ModelEntry, threads: int | None, prefix: str) -> list[tuple[str, bool, str]]:
    golden = entry.golden
    try:
        prompts, expected = load_prompts(folder / golden.file)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        return [(f"golden:{prefix}", False, f"{golden.get('file')} is unreadable or corrupt: {exc}")]
    providers = entry.runtime.providers  # the ones the golden tokens were made on
    dec = OrtDecoder(folder / entry.model_file, threads=threads or golden.get("threads"), providers=providers)
    eos = [int(t) for t in golden.get("eos_token_ids", [])]
    start = time.perf_counter()
    results = []
    for i, (prompt, want) in enumerate(zip(prompts, expected, strict=True)):
        got = greedy(dec, prompt, int(golden.get("max_new_tokens", len(want))), eos)
        same = matched(list(want), got)
        ok = same == len(want) == len(got)
        results.append((f"golden:{prefix}prompt {i}", ok, f"{same}/{len(want)} greedy tokens match ({time.perf_counter() - start:.1f}s)"))
    return results


def bench(folder: Path, manifest: Manifest, threads: int | None, prefill_tokens: int, decode_tokens: int, runs: int) -> dict[str, Any]:
    prompts, _ = load_prompts(folder / manifest.primary.golden.file)
    if not prompts:
        raise BadInput(f"{folder}: golden.npz holds no prompts; rebuild the artifact")
    dec = OrtDecoder(folder / manifest.primary.model_file, threads=threads)
    return {"artifact": str(folder), "providers": dec.session.get_providers(),
            **bench_decoder(dec, np.concatenate(prompts), prefill_tokens, decode_tokens, runs)}


def bench_cli(folder: Path, manifest: Manifest, args: Any) -> int:
    """``edgepipe bench`` on a decoder artifact: prefill ms, time to first token, decode tokens/s, peak RSS."""
    import json

    result = bench(folder, manifest, args.threads, args.prefill, args.decode, runs=max(1, min(args.runs, 5)))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{folder}: load {result['load_ms']} ms, peak RSS {result['peak_rss_mb']} MB, on {result['providers'][0]}")
        print(f"  prefill {result['prefill_tokens']} tokens: {result['prefill_ms']:.1f} ms (time to first token {result['ttft_ms']:.1f} ms)")
        print(f"  decode: {result['decode_tokens_per_s']:.1f} tokens/s ({result['decode_ms_per_token']:.2f} ms/token over {result['decode_tokens']} tokens)")
    return 0
