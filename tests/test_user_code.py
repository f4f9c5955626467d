"""User code as users write it: a factory importing a file beside it, package.module:function, factory args."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgepipe.cli import main
from edgepipe.recipe import load_recipe
from edgepipe.sources.export import export_torch

RECIPE = """
name: user-code
model: {MODEL}
inputs: [{name: x, shape: [batch, 6], dtype: float32}]
outputs: [y]
accuracy: {metric: cosine, max_drop: 0.05}
targets: [cpu]
"""
FACTORY = """
from helper import make          # a file beside this one, as users write it

def build():
    return make()
"""
HELPER = """
import torch

def make():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, {hidden}), torch.nn.ReLU(), torch.nn.Linear({hidden}, 3)).eval()
"""
LAZY = """
def build():
    from helper import make      # imported when the factory runs, not when the file is imported
    return make()
"""


def _folder(root: Path, model: str, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).write_text(text)
    (root / "recipe.yaml").write_text(RECIPE.replace("{MODEL}", model))
    return root / "recipe.yaml"


def _weights(path: Path) -> list[tuple[int, ...]]:
    return sorted(tuple(numpy_helper.to_array(t).shape) for t in onnx.load(str(path)).graph.initializer if len(t.dims) == 2)


@pytest.mark.parametrize("factory", [FACTORY, LAZY], ids=["import-at-top", "import-in-function"])
def test_factory_imports_a_file_beside_it_without_leaking(factory, tmp_path):
    """Two recipes, each with its own helper.py: each gets its own, and nothing stays on sys.path."""
    path_before, modules_before = list(sys.path), set(sys.modules)
    shapes = []
    for hidden in (5, 7):
        folder = tmp_path / f"h{hidden}"
        recipe = load_recipe(_folder(folder, "{torch: model.py:build}", {"model.py": factory, "helper.py": HELPER.replace("{hidden}", str(hidden))}))
        shapes.append(_weights(export_torch(recipe, folder, None).onnx_path))
    assert shapes == [[(3, 5), (5, 6)], [(3, 7), (7, 6)]]
    assert sys.path == path_before
    assert "helper" not in sys.modules and "helper" not in modules_before


def test_installed_callable_with_args(tmp_path, monkeypatch):
    """package.module:function (an importable module, here one in tests/) called with the recipe's args."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    model = "{torch: 'user_factories:mlp', args: {hidden: 11, classes: 4}}"
    out = tmp_path / "out"
    assert main(["build", str(_folder(tmp_path, model, {})), "-o", str(out), "--quiet", "--executor", "inprocess"]) == 0  # sys.path from monkeypatch
    assert (out / "user-code" / "cpu" / "model.onnx").is_file()
    source = export_torch(load_recipe(tmp_path / "recipe.yaml"), tmp_path, None)
    assert _weights(source.onnx_path) == [(4, 11), (11, 6)]
    import torch
    import user_factories

    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    want = user_factories.mlp(hidden=11, classes=4)(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(source.reference({"x": x})["y"], want, rtol=1e-6)


@pytest.mark.parametrize(
    "model, files, expected",
    [
        ("{torch: 'no_such_pkg.models:resnet18'}", {}, "no installed module 'no_such_pkg'"),
        ("{torch: 'json.nope:build'}", {}, "no module named 'json.nope'"),
        ("{torch: 'json:no_such_function'}", {}, "has no function 'no_such_function'"),
        ("{torch: model.py:build, arg: {hidden: 3}}", {"model.py": "def build():\n    pass\n"}, "did you mean 'args'"),
        ("{torch: model.py:build, args: {width: 3}}", {"model.py": "def build(hidden=2):\n    pass\n"}, "does not take model.args ['width']"),
        ("{onnx: m.onnx, args: {hidden: 3}}", {"m.onnx": ""}, "use them with model.torch"),
        ("{torch: model.py:build}", {"model.py": "from helper_gone import make\n"}, "No module named 'helper_gone'"),
    ],
    ids=["package-missing", "module-missing", "function-missing", "args-typo", "args-unknown", "args-without-torch", "helper-missing"],
)
def test_bad_user_code_is_one_line_exit_2(model, files, expected, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["build", str(_folder(tmp_path, model, files)), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (out / "user-code" / "cpu").exists()
