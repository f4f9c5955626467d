"""report.html: every target of a build side by side (self-contained, offline)."""

from __future__ import annotations

import html
from pathlib import Path

from edgepipe.build import TargetResult


def _size(result: TargetResult) -> int:
    files = result.manifest.get("files", {})
    model = result.manifest.get("model_file")
    if result.folder is not None and model and (result.folder / model).exists():
        return (result.folder / model).stat().st_size
    return 0 if not files else -1


def _distill_section(results: list[TargetResult]) -> str:
    """Teacher vs student, when the build distilled the model first (same record in every target)."""
    d = next((r.manifest["distill"] for r in results if r.manifest.get("distill")), None)
    if not d:
        return ""
    t, s, data = d["teacher"], d["student"], d.get("data", {})
    how = ", ".join(f"{k} {v}" for k, v in s.items() if k not in ("params", "ratio", "sha256"))
    before, after = d.get("metrics_before", {}), d.get("metrics", {})
    metrics = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{before.get(k, '')}</td><td>{v}</td></tr>" for k, v in after.items() if k != "samples"
    )
    rows = [
        ("teacher", f"{t['params']:,} params, sha256 {t['sha256'][:12]}… ({html.escape(str(t.get('source', '')))})"),
        ("student", f"{s['params']:,} params ({s['ratio']:.1%} of the teacher): {html.escape(how)}"),
        ("data", f"{html.escape(str(data.get('source', '')))}: {data.get('samples', '')} samples; eval on {html.escape(str(d.get('eval_data', '')))}"),
        ("training", f"loss {d['loss']}, temperature {d['temperature']}, {d['epochs']} epochs, lr {d['lr']}, batch {d['batch_size']}, "
                     f"seed {d['seed']}, {d['threads']} threads, {d.get('seconds', '')} s"),
        ("budget", f"drop {d.get('drop')} (max {d.get('max_drop')}): {'passed' if d.get('passed') else 'FAILED'}"),
    ]
    head = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return (f"<h2>Distillation</h2><table>{head}</table><h3>student vs teacher (eval data)</h3>"
            f"<table><tr><th>metric</th><th>student before training</th><th>student after</th></tr>{metrics}</table>")


def write_report(root: Path, name: str, results: list[TargetResult]) -> Path:
    rows = []
    for r in results:
        m = r.manifest
        acc = m.get("accuracy", {})
        lat = m.get("latency", {})
        passes = "<br>".join(
            f"{html.escape(p['name'])}: nodes {p['stats']['before']['nodes']}→{p['stats']['after']['nodes']}, "
            f"bytes {p['stats']['before']['bytes']:,}→{p['stats']['after']['bytes']:,}"
            for p in m.get("passes", [])
        )
        status = "passed" if r.passed else f"FAILED ({html.escape(r.error or '')})"
        rows.append(
            f"<tr><td>{html.escape(r.target)}</td><td class='{'ok' if r.passed else 'bad'}'>{status}</td>"
            f"<td>{_size(r):,}</td><td>{acc.get('metric', '')}: {acc.get('reference', 0):.4f} → {acc.get('value', 0):.4f}"
            f" (drop {acc.get('drop', 0):+.4f})</td><td>{lat.get('p50_ms', '')}</td><td>{passes}</td></tr>"
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>edgepipe: {html.escape(name)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.4em .7em;vertical-align:top}}.ok{{color:#070}}.bad{{color:#b00}}</style></head>
<body><h1>edgepipe build: {html.escape(name)}</h1>
<table><tr><th>target</th><th>status</th><th>model bytes</th><th>accuracy (reference → artifact)</th><th>p50 ms (batch 1)</th><th>passes</th></tr>
{''.join(rows)}</table>{_distill_section(results)}</body></html>
"""
    path = root / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
