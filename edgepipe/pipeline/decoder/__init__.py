"""Decoder LLMs (task text-generation): source, export with a KV cache, weight-only int4/int8, checks, genai artifact."""
