"""Runs inside the onnxruntime-genai venv for benchmarks/llm_vs_genai.py: prefill ms, decode tokens/s, greedy tokens.

Usage: GENAI_PYTHON llm_genai_worker.py JOB.json   (prints one JSON object on stdout)
JOB: {"folders": [...], "prefill": [ids], "decode_tokens": N, "reps": R, "threads": T, "prompts": [[ids], ...],
      "greedy_tokens": 32}. Folders are measured in turn within each repetition, so they share the machine's state.
"""

from __future__ import annotations

import json
import sys
import time

import onnxruntime_genai as og


def load(folder: str, threads: int) -> og.Model:
    config = og.Config(folder)
    config.clear_providers()  # cpu
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads,
                                                                               "inter_op_num_threads": 1}}}}))
    return og.Model(config)


def generator(model: og.Model, max_length: int) -> og.Generator:
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=max_length, min_length=max_length)
    return og.Generator(model, params)


def speed(model: og.Model, prefill: list[int], decode_tokens: int) -> tuple[float, float]:
    """(prefill ms of the prompt, decode tokens/s of the next decode_tokens steps)."""
    gen = generator(model, len(prefill) + decode_tokens + 1)
    start = time.perf_counter()
    gen.append_tokens(prefill)  # runs the prompt through the model
    prefill_ms = (time.perf_counter() - start) * 1000
    gen.generate_next_token()  # picks the first token from the prefill's logits
    start = time.perf_counter()
    steps = 0
    while steps < decode_tokens and not gen.is_done():
        gen.generate_next_token()  # one decode step on the KV cache, then the argmax
        steps += 1
    return prefill_ms, steps / (time.perf_counter() - start)


def greedy(model: og.Model, prompt: list[int], n: int) -> list[int]:
    gen = generator(model, len(prompt) + n)
    gen.append_tokens(prompt)
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)[len(prompt):]]


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    models = {f: load(f, job.get("threads", 0)) for f in job["folders"]}
    result: dict[str, dict] = {f: {"prefill_ms": [], "decode_tps": []} for f in models}
    for folder, model in models.items():  # warm-up, and the tokens to check against the ORT session's greedy
        speed(model, job["prefill"], 4)
        result[folder]["greedy"] = [greedy(model, p, job["greedy_tokens"]) for p in job["prompts"]]
    for _ in range(job["reps"]):
        for folder, model in models.items():
            ms, tps = speed(model, job["prefill"], job["decode_tokens"])
            result[folder]["prefill_ms"].append(ms)
            result[folder]["decode_tps"].append(tps)
    result["versions"] = {"onnxruntime-genai": og.__version__}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
