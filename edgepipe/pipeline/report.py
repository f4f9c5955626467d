"""report.html: every target of a build side by side, with inline SVG plots (offline, no CDN)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from edgepipe.core.manifest import Manifest, ModelEntry
from edgepipe.core.result import TargetResult

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em;color:#222;max-width:1200px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.3em .6em;vertical-align:top;font-size:.9em}
th{background:#f4f4f4;text-align:left}.ok{color:#070;font-weight:600}.bad{color:#b00;font-weight:600}
.warn{background:#fff6d6;padding:.4em .7em;border-left:4px solid #e0a800;margin:.4em 0}
.plots{display:flex;flex-wrap:wrap;gap:2em}figure{margin:0}figcaption{font-size:.85em;color:#555}
code{font-size:.85em}details{margin:.4em 0}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _scatter(results: list[TargetResult]) -> str:
    """Size (x) vs p50 latency (y), each target a labelled dot with its metric value."""
    pts = [
        (r, m, int(m.size.model_bytes) / 1024, m.latency.p50_ms, len(_models(r.manifest)) == 1)
        for r in results if r.manifest for m in _models(r.manifest)
    ]
    if not pts:
        return ""
    w, plot_h, pad = 480, 300, 68
    h = plot_h + 18 * len(pts) + 8  # room for the legend under the plot
    xmax = max(p[2] for p in pts) * 1.15 or 1
    ymax = max(p[3] for p in pts) * 1.15 or 1
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="size vs latency">',
             f'<line x1="{pad}" y1="{plot_h - pad}" x2="{w - 10}" y2="{plot_h - pad}" stroke="#333"/>',
             f'<line x1="{pad}" y1="10" x2="{pad}" y2="{plot_h - pad}" stroke="#333"/>',
             f'<text x="{w / 2}" y="{plot_h - 22}" text-anchor="middle" font-size="12">model size (KiB)</text>',
             f'<text x="12" y="{plot_h / 2}" text-anchor="middle" font-size="12" transform="rotate(-90 12 {plot_h / 2})">p50 latency, batch 1 (ms)</text>']
    for i in range(5):
        fx, fy = i / 4 * xmax, i / 4 * ymax
        x = pad + (w - pad - 10) * i / 4
        y = plot_h - pad - (plot_h - pad - 10) * i / 4
        parts.append(f'<text x="{x}" y="{plot_h - pad + 14}" text-anchor="middle" font-size="10">{fx:.0f}</text>')
        parts.append(f'<text x="{pad - 4}" y="{y + 3}" text-anchor="end" font-size="10">{fy:.3g}</text>')
    for i, (r, m, sx, sy, only) in enumerate(pts):
        x = pad + (w - pad - 10) * sx / xmax
        y = plot_h - pad - (plot_h - pad - 10) * sy / ymax
        acc = m.accuracy
        color = COLORS[i % len(COLORS)]
        name = r.target if only or m.model_file == "model.onnx" else f"{r.target} {m.label}"
        label = f"{name} ({acc.metric} {acc.value:.3f})"
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="7" fill="{color}" stroke="{"#070" if r.passed else "#b00"}" stroke-width="2"/>')
        parts.append(f'<text x="{x:.1f}" y="{y + 4:.1f}" font-size="9" fill="#fff" text-anchor="middle">{i + 1}</text>')
        ly = plot_h + 4 + 18 * i  # legend: number, color, name, metric, size, latency
        parts.append(f'<circle cx="{pad + 6}" cy="{ly + 6}" r="6" fill="{color}"/>')
        parts.append(f'<text x="{pad + 18}" y="{ly + 10}" font-size="11">{i + 1}. {_e(label)}: {sx:,.1f} KiB, {sy:.3f} ms</text>')
    parts.append("</svg>")
    return "".join(parts)


def _bars(title: str, rows: list[tuple[str, float]], unit: str = "", ref: float | None = None, zoom: bool = False) -> str:
    """Horizontal bars (label, value); an optional dashed reference line; ``zoom`` starts the axis near the data."""
    if not rows:
        return ""
    w, bar, pad = 460, 22, 170
    h = 30 + bar * len(rows)
    values = [v for _, v in rows] + ([ref] if ref is not None else [])
    lo = min(0.0, *(v for _, v in rows))
    if zoom:
        spread = max(values) - min(values)
        lo = min(values) - max(spread, 0.02 * abs(max(values)) or 0.01)
    hi = max(*(v for _, v in rows), ref if ref is not None else 0.0) or 1.0
    span = (hi - lo) or 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="{_e(title)}">']
    for i, (label, v) in enumerate(rows):
        y = 10 + i * bar
        x0 = pad + ((lo if zoom else 0.0) - lo) / span * (w - pad - 60)
        x1 = pad + (v - lo) / span * (w - pad - 60)
        parts.append(f'<text x="{pad - 6}" y="{y + 14}" text-anchor="end" font-size="11">{_e(label[:28])}</text>')
        parts.append(f'<rect x="{min(x0, x1):.1f}" y="{y + 3}" width="{max(abs(x1 - x0), 1):.1f}" height="{bar - 6}" fill="{COLORS[i % len(COLORS)]}"/>')
        parts.append(f'<text x="{max(x0, x1) + 4:.1f}" y="{y + 14}" font-size="10">{v:.4g}{unit}</text>')
    if ref is not None:
        xr = pad + (ref - lo) / span * (w - pad - 60)
        parts.append(f'<line x1="{xr:.1f}" y1="5" x2="{xr:.1f}" y2="{h - 10}" stroke="#333" stroke-dasharray="4 3"/>')
        parts.append(f'<text x="{xr:.1f}" y="{h - 1}" text-anchor="middle" font-size="10">reference</text>')
    parts.append("</svg>")
    return "".join(parts)


def _models(manifest: dict) -> tuple[ModelEntry, ...]:
    """Every model a folder ships (a gpu folder has an fp16 and an int8 model), each with its own checks."""
    return Manifest.from_json(manifest).entries


def _summary_table(results: list[TargetResult]) -> str:
    rows = []
    for r in results:
        status = "<span class='ok'>passed</span>" if r.passed else f"<span class='bad'>FAILED</span> {_e(r.error or '')}"
        for i, m in enumerate(_models(r.manifest)):
            acc, lat, size = m.accuracy, m.latency, m.size
            rows.append(
                f"<tr><td>{_e(r.target) if i == 0 else ''}</td><td>{status if i == 0 else ''}</td><td>{_e(m.model_file)}</td>"
                f"<td>{size.model_bytes / 1024:,.1f} KiB ({size.ratio:.0%} of fp32)</td>"
                f"<td>{_e(acc.metric)}: {acc.reference:.4f} → {acc.value:.4f} "
                f"(drop {acc.drop:+.4f}; budget {_e(acc.budget or {})}; {_e(acc.data)} data, {acc.samples} samples)</td>"
                f"<td>{lat.p50_ms:.3f} / {lat.p90_ms:.3f}</td>"
                f"<td>{_e(', '.join(m.runtime.providers or []))}</td></tr>"
            )
    head = "<tr><th>target</th><th>status</th><th>file</th><th>size</th><th>accuracy (reference → artifact)</th><th>p50 / p90 ms (b1)</th><th>ran on</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def _fmt_stats(stats: dict) -> str:
    b, a = stats.get("before", {}), stats.get("after", {})
    core = (f"nodes {b.get('nodes')}→{a.get('nodes')}, params {b.get('params', 0):,}→{a.get('params', 0):,}, "
            f"bytes {b.get('bytes', 0):,}→{a.get('bytes', 0):,}, sparsity {b.get('sparsity', 0):.1%}→{a.get('sparsity', 0):.1%}")
    extra = {k: v for k, v in stats.items() if k not in ("before", "after")}
    more = f"<details><summary>details</summary><code>{_e(json.dumps(extra, default=str)[:4000])}</code></details>" if extra else ""
    return core + more


def _rank_value(row: dict) -> str:
    """Per-node sensitivity (metric gained when float), or the quantization noise the node reads (probe ranking)."""
    return f"{row['gain']:+.6f}" if "gain" in row else f"noise {row.get('noise', 0):.2e}"


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
        f"<tr><td>{_e(r['node'])}</td><td>{_e(r['op'])}</td><td>{_rank_value(r)}</td><td>{r.get('weights', 0):,}</td></tr>"
        for r in stats.get("sensitivity", [])[:10]
    )
    kept = ", ".join(_e(k) for k in stats.get("kept_float", [])) or "none"
    return (
        f"<p><b>{_e(p['name'])}</b>: {_e(stats.get('summary', ''))}<br>kept in float: {kept}</p>"
        f"<table><tr><th>nodes kept float</th><th>metric</th><th></th></tr>{steps}</table>"
        + (f"<table><tr><th>most sensitive node</th><th>op</th><th>metric gain when float (or noise read)</th><th>weights</th></tr>{ranked}</table>" if ranked else "")
    )


def _target_section(r: TargetResult) -> str:
    m = r.manifest
    rows = "".join(
        f"<tr><td>{_e(p['name'])}</td><td><code>{_e(json.dumps(p.get('params', {}), default=str)[:300])}</code></td>"
        f"<td>{_fmt_stats(p.get('stats', {}))}</td></tr>"
        for p in m.get("passes", [])
    )
    warnings = "".join(f"<div class='warn'>{_e(w)}</div>" for w in m.get("warnings", []))
    searches = "".join(_search_table(p) for p in m.get("passes", []))
    sens = m.get("sensitivity") or next((p["stats"]["sensitivity"] for p in m.get("passes", []) if p.get("stats", {}).get("sensitivity")), [])
    sens_plot = ""
    if sens:
        top = sorted(sens, key=lambda s: -abs(s.get("gain", s.get("delta", 0))))[:15]
        sens_plot = "<figure>" + _bars("sensitivity", [(s.get("node", "?"), s.get("gain", s.get("delta", 0))) for s in top]) + \
            "<figcaption>per-node sensitivity: metric gained when that node alone stays in float</figcaption></figure>"
    from edgepipe.pipeline.decoder.report import generation_section  # text-generation artifacts only; "" otherwise

    sens_plot += generation_section(Manifest.from_json(m))
    known = {"passes", "warnings", "sensitivity", "files", "digest", "content_sha256", "schema_version"}
    rest = {k: v for k, v in m.items() if k not in known}
    return (f"<h2>{_e(r.target)}: {_e(m.get('description', ''))}</h2>{warnings}"
            f"<table><tr><th>pass</th><th>params</th><th>what it did</th></tr>{rows}</table>{searches}{sens_plot}"
            f"<details><summary>manifest</summary><pre>{_e(json.dumps(rest, indent=2, default=str)[:20000])}</pre></details>")


def _distill_section(results: list[TargetResult]) -> str:
    """Teacher vs student, when the build distilled the model first (same record in every target)."""
    d = next((Manifest.from_json(r.manifest).primary.distill for r in results if r.manifest.get("distill")), None)
    if not d:
        return ""
    t, s, data = d["teacher"], d["student"], d.get("data", {})
    how = ", ".join(f"{k} {v}" for k, v in s.items() if k not in ("params", "ratio", "sha256"))
    before, after = d.get("metrics_before", {}), d.get("metrics", {})
    metrics = "".join(f"<tr><td>{_e(k)}</td><td>{_e(before.get(k, ''))}</td><td>{_e(v)}</td></tr>" for k, v in after.items() if k != "samples")
    rows = [
        ("teacher", f"{t['params']:,} params, sha256 {t['sha256'][:12]}… ({_e(t.get('source', ''))})"),
        ("student", f"{s['params']:,} params ({s['ratio']:.1%} of the teacher): {_e(how)}"),
        ("data", f"{_e(data.get('source', ''))}: {data.get('samples', '')} samples; eval on {_e(d.get('eval_data', ''))}"),
        ("training", f"loss {d['loss']}, temperature {d['temperature']}, {d['epochs']} epochs, lr {d['lr']}, batch {d['batch_size']}, "
                     f"seed {d['seed']}, {d['threads']} threads, {d.get('seconds', '')} s"),
        ("budget", f"drop {d.get('drop')} (max {d.get('max_drop')}): {'passed' if d.get('passed') else 'FAILED'}"),
    ]
    head = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return (f"<h2>Distillation</h2><table>{head}</table><h3>student vs teacher (eval data)</h3>"
            f"<table><tr><th>metric</th><th>student before training</th><th>student after</th></tr>{metrics}</table>")


def write_report(root: Path, name: str, results: list[TargetResult]) -> Path:
    acc_rows = [
        (r.target if len(_models(r.manifest)) == 1 else f"{r.target} {m.model_file}", float(m.accuracy.value))
        for r in results if r.manifest for m in _models(r.manifest)
    ]
    primaries = [Manifest.from_json(r.manifest).primary for r in results if r.manifest.get("accuracy")]
    ref = next((m.accuracy.reference for m in primaries), None)
    metric = next((m.accuracy.metric for m in primaries), "")
    plots = (f"<div class='plots'><figure>{_scatter(results)}<figcaption>size vs latency (dot outline: green passed, red failed)</figcaption></figure>"
             f"<figure>{_bars('accuracy', acc_rows, ref=ref, zoom=True)}<figcaption>{_e(metric)} per target (axis zoomed); dashed: reference model</figcaption></figure></div>")
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>edgepipe: {_e(name)}</title>"
            f"<style>{CSS}</style></head><body><h1>edgepipe build: {_e(name)}</h1>"
            f"{_summary_table(results)}{plots}{_distill_section(results)}{''.join(_target_section(r) for r in results)}</body></html>\n")
    path = root / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
