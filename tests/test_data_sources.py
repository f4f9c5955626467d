"""Data sources: a folder of images with declared preprocessing, and text files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from edgepipe.core.errors import BadInput
from edgepipe.recipe import ImagePreprocess
from edgepipe.sources.data import calibration_source, eval_batches, read_lines

SPEC = ImagePreprocess(size=[8, 8], mode="L", scale=1 / 255)


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    """Real digits as PNG files, one sub-folder per class (0..9), 5 per class."""
    root = tmp_path_factory.mktemp("digits-png")
    digits = load_digits()
    for label in range(10):
        (root / str(label)).mkdir()
        for k, index in enumerate(np.flatnonzero(digits.target == label)[:5]):
            pixels = np.clip(digits.images[index] * 255 / 16, 0, 255).round().astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(root / str(label) / f"{k}.png")
    return root, digits


def test_image_folder_with_class_subfolders_gives_inputs_and_labels(digit_folder):
    root, digits = digit_folder
    batches = eval_batches(root.name, root.parent, images=(SPEC, "image"))
    x = np.concatenate([b["image"] for b, _ in batches])
    y = np.concatenate([lab for _, lab in batches])
    assert x.shape == (50, 1, 8, 8) and x.dtype == np.float32
    assert list(y) == [c for c in range(10) for _ in range(5)]
    first = digits.images[np.flatnonzero(digits.target == 0)[0]] / 16
    np.testing.assert_allclose(x[0, 0], first, atol=1 / 255 + 1e-6)


def test_preprocessing_layout_mean_std(digit_folder):
    root, _ = digit_folder
    spec = ImagePreprocess(size=[4, 6], mode="RGB", scale=1 / 255, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], layout="NHWC")
    batch = next(iter(calibration_source(str(root / "3"), root, images=(ImagePreprocess(**{**spec.model_dump(), "input": "pixels"}), None))()))
    assert batch["pixels"].shape == (5, 4, 6, 3)
    assert batch["pixels"].min() >= -2.0 - 1e-6 and batch["pixels"].max() <= 2.0 + 1e-6  # (x - 0.5) / 0.25


def test_image_folder_errors_are_one_line(digit_folder, tmp_path):
    root, _ = digit_folder
    with pytest.raises(BadInput, match="declare its preprocessing under data.images"):
        eval_batches(root.name, root.parent)
    with pytest.raises(BadInput, match="name the model input"):
        eval_batches(root.name, root.parent, images=(SPEC, None))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="no images"):
        eval_batches("empty", tmp_path, images=(SPEC, "image"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_text("not a png")
    with pytest.raises(BadInput, match="not a readable image"):
        eval_batches("bad", tmp_path, images=(SPEC, "image"))


def test_scarce_calibration_and_missing_eval_warn_in_manifest_and_report(digits_onnx, tmp_path):
    from conftest import write_onnx_recipe

    from edgepipe.pipeline.build import build
    from edgepipe.pipeline.report import write_report
    from edgepipe.recipe import load_recipe

    images = (load_digits().images[:16] / 16).astype(np.float32)[:, None]
    np.savez(tmp_path / "cal.npz", image=images)
    recipe = write_onnx_recipe(tmp_path, digits_onnx, """
name: scarce
model: {torch: model.py:build}
inputs: [{name: image, shape: [batch, 1, 8, 8], dtype: float32}]
data: {calibration: cal.npz}
accuracy: {metric: top1, max_drop: 1.0}
""")
    results = build(load_recipe(recipe), tmp_path / "out")
    warnings = results[0].manifest["warnings"]
    assert any("only 16 calibration samples" in w for w in warnings)
    assert any("measured on the calibration data" in w for w in warnings)
    report = write_report(tmp_path / "out" / "scarce", "scarce", results).read_text()
    assert "only 16 calibration samples" in report


def test_text_file_lines_and_batches(tmp_path):
    (tmp_path / "t.txt").write_text("# source: test\nfirst line\n\n  second line  \n" + "x\n" * 40)
    assert read_lines(tmp_path / "t.txt")[:2] == ["first line", "second line"]
    batches = eval_batches("t.txt", tmp_path, encoder=lambda lines: {"n": np.array([len(s) for s in lines])})
    assert [len(b["n"]) for b, _ in batches] == [32, 10] and all(y is None for _, y in batches)
