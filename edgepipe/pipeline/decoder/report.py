"""The report.html section of a text-generation artifact: perplexity, next-token agreement, greedy match, speed."""

from __future__ import annotations

import html

from edgepipe.core.manifest import Manifest, ModelEntry


def generation_section(manifest: Manifest) -> str:
    """One table per model the folder ships (a gpu folder: fp16 and int4)."""
    models = manifest.entries
    return "".join(_table(m, f" ({m.model_file})" if len(models) > 1 else "") for m in models if "generation" in m.present)


def _table(entry: ModelEntry, title: str) -> str:
    gen, lat = entry.generation, entry.latency
    ppl, nt, gr = gen.perplexity or {}, gen.next_token or {}, gen.greedy or {}
    rows = [
        ("perplexity (eval text)", f"{ppl['reference']:.3f} (PyTorch) → {ppl['artifact']:.3f} ({100 * ppl['increase']:+.1f} %)"),
        ("next-token top-1 agreement (teacher-forced)", f"{nt['top1']:.4f} over {nt['positions']} positions"),
        ("logits cosine vs PyTorch", f"mean {nt['cosine']:.4f}, min {nt['cosine_min']:.4f}"),
        ("greedy tokens matched before divergence", f"{gr['mean_matched']:.1f} / {gr['max_new_tokens']} on average; "
                                                     f"{gr['identical']} of {gr['prompts']} prompts identical; per prompt {gr['matched']}"),
        ("prefill", f"{lat.get('prefill_tokens', 0)} tokens in {lat.get('prefill_ms', 0):.1f} ms (time to first token {lat.get('ttft_ms', 0):.1f} ms)"),
        ("decode", f"{lat.get('decode_tokens_per_s', 0):.1f} tokens/s ({lat.get('decode_ms_per_token', 0):.2f} ms/token); peak RSS {lat.get('peak_rss_mb', 0)} MB"),
    ]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<h3>generation checks{html.escape(title)}</h3><table>{body}</table>"
