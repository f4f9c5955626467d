"""report.html: self-contained, every target, plots inline."""

from __future__ import annotations

import re


def test_report_is_offline_and_complete(digits_build):
    page = (digits_build / "report.html").read_text()
    assert page.startswith("<!doctype html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # no CDN, nothing remote
    assert "<script" not in page
    assert page.count("<svg") >= 2  # size-vs-latency scatter and the accuracy bars
    assert "cpu (top1 0.986)" in page
    for name in ("cleanup", "optimize.ort", "quantize.static"):
        assert f"<td>{name}</td>" in page
