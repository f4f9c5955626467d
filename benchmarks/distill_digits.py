"""Digits CNN teacher vs its distilled student, both built to the cpu target in one run: params, top-1, size, latency."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from edgepipe.cli import main as edgepipe

DIGITS = Path(__file__).resolve().parents[1] / "models" / "digits"


def build(recipe: str, out: Path) -> dict:
    assert edgepipe(["build", str(DIGITS / recipe), "-o", str(out), "--quiet", "--force"]) == 0
    name = "digits-cnn-distilled" if "distilled" in recipe else "digits-cnn"
    folder = out / name / "cpu"
    assert edgepipe(["verify", str(folder)]) == 0
    return json.loads((folder / "manifest.json").read_text())


def main() -> None:
    out = Path(tempfile.mkdtemp(prefix="distill-digits-"))
    teacher, student = build("recipe.yaml", out), build("recipe-distilled.yaml", out)
    d = student["distill"]
    rows = [
        ("parameters", d["teacher"]["params"], d["student"]["params"]),
        ("top-1, PyTorch (test split)", d["metrics"]["teacher_top1"], d["metrics"]["student_top1"]),
        ("top-1, cpu int8 artifact", teacher["accuracy"]["value"], student["accuracy"]["value"]),
        ("artifact bytes", teacher["size"]["model_bytes"], student["size"]["model_bytes"]),
        ("p50 ms, batch 1", teacher["latency"]["p50_ms"], student["latency"]["p50_ms"]),
    ]
    print(f"\n{'':<30}{'teacher':>12}{'student':>12}{'student/teacher':>17}")
    for label, t, s in rows:
        fmt = "{:>12,}" if isinstance(t, int) else "{:>12.4f}"
        print(f"{label:<30}" + fmt.format(t) + fmt.format(s) + f"{s / t:>17.3f}")
    print(f"\nstudent: {d['student']}  agreement with teacher {d['metrics']['agreement']}, "
          f"top-1 drop {d['metrics']['top1_drop']:.4f}; distillation {d['seconds']} s ({d['epochs']} epochs, {d['threads']} threads)")


if __name__ == "__main__":
    main()
