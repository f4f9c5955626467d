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


def _search_table(p: dict) -> str:
    """quantize.auto: the steps tried and the most sensitive nodes (what was kept in float and why)."""
    stats = p.get("stats", {})
    if "steps" not in stats:
        return ""
    steps = "".join(
        f"<tr><td>{s['kept_float']}</td><td>{s['metric']:.6f}</td><td>{'meets' if s['passed'] else 'breaks'} budget</td></tr>"
        for s in stats["steps"]
    )
    ranked = "".join(
        f"<tr><td>{html.escape(r['node'])}</td><td>{r['op']}</td><td>{r['gain']:+.6f}</td><td>{r.get('weights', 0):,}</td></tr>"
        for r in stats.get("sensitivity", [])[:10]
    )
    kept = ", ".join(html.escape(k) for k in stats.get("kept_float", [])) or "none"
    return (
        f"<p><b>{html.escape(p['name'])}</b>: {html.escape(stats.get('summary', ''))}<br>kept in float: {kept}</p>"
        f"<table><tr><th>nodes kept float</th><th>metric</th><th></th></tr>{steps}</table>"
        + (f"<table><tr><th>most sensitive node</th><th>op</th><th>metric gain when float</th><th>weights</th></tr>{ranked}</table>" if ranked else "")
    )


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
        status += "".join(f"<div class='warn'>⚠ {html.escape(w)}</div>" for w in m.get("warnings", []))
        passes += "".join(_search_table(p) for p in m.get("passes", []))
        rows.append(
            f"<tr><td>{html.escape(r.target)}</td><td class='{'ok' if r.passed else 'bad'}'>{status}</td>"
            f"<td>{_size(r):,}</td><td>{acc.get('metric', '')}: {acc.get('reference', 0):.4f} → {acc.get('value', 0):.4f}"
            f" (drop {acc.get('drop', 0):+.4f})</td><td>{lat.get('p50_ms', '')}</td><td>{passes}</td></tr>"
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>edgepipe: {html.escape(name)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.4em .7em;vertical-align:top}}.ok{{color:#070}}.bad{{color:#b00}}.warn{{color:#a60;font-size:90%}}</style></head>
<body><h1>edgepipe build: {html.escape(name)}</h1>
<table><tr><th>target</th><th>status</th><th>model bytes</th><th>accuracy (reference → artifact)</th><th>p50 ms (batch 1)</th><th>passes</th></tr>
{''.join(rows)}</table></body></html>
"""
    path = root / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
