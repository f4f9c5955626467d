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


def _accuracy(manifest: dict) -> str:
    """One line per model (a gpu folder ships two, each checked on its own)."""
    models = manifest.get("models") or [manifest]
    lines = []
    for m in models:
        acc = m.get("accuracy", {})
        label = f"{html.escape(m.get('model_file', ''))}: " if len(models) > 1 else ""
        lines.append(f"{label}{acc.get('metric', '')}: {acc.get('reference', 0):.4f} → {acc.get('value', 0):.4f} (drop {acc.get('drop', 0):+.4f})")
    return "<br>".join(lines)


def write_report(root: Path, name: str, results: list[TargetResult]) -> Path:
    rows = []
    for r in results:
        m = r.manifest
        lat = m.get("latency", {})
        passes = "<br>".join(
            f"{html.escape(p['name'])}: nodes {p['stats']['before']['nodes']}→{p['stats']['after']['nodes']}, "
            f"bytes {p['stats']['before']['bytes']:,}→{p['stats']['after']['bytes']:,}"
            for p in m.get("passes", [])
        )
        status = "passed" if r.passed else f"FAILED ({html.escape(r.error or '')})"
        rows.append(
            f"<tr><td>{html.escape(r.target)}</td><td class='{'ok' if r.passed else 'bad'}'>{status}</td>"
            f"<td>{_size(r):,}</td><td>{_accuracy(m)}</td><td>{lat.get('p50_ms', '')}</td><td>{passes}</td></tr>"
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>edgepipe: {html.escape(name)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.4em .7em;vertical-align:top}}.ok{{color:#070}}.bad{{color:#b00}}</style></head>
<body><h1>edgepipe build: {html.escape(name)}</h1>
<table><tr><th>target</th><th>status</th><th>model bytes</th><th>accuracy (reference → artifact)</th><th>p50 ms (batch 1)</th><th>passes</th></tr>
{''.join(rows)}</table></body></html>
"""
    path = root / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
