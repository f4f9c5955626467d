"""Fuzzing the loaders: mutated recipes, manifests and model files give clean errors, never crashes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import yaml
from conftest import DIGITS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from edgepipe.core.artifact import read_manifest
from edgepipe.core.errors import EdgepipeError
from edgepipe.pipeline.inspect_model import inspect_model
from edgepipe.pipeline.verify import verify
from edgepipe.recipe import load_recipe, parse_recipe
from edgepipe.sources.export import check_onnx_file

EXAMPLES = int(os.environ.get("EDGEPIPE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
COUNT: dict[str, int] = {}

GOOD = yaml.safe_load((DIGITS / "recipe.yaml").read_text())
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)


def _counted(name: str) -> None:
    COUNT[name] = COUNT.get(name, 0) + 1


def _tiny_model_bytes() -> bytes:
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


TINY = _tiny_model_bytes()


@FUZZ
@given(path=st.lists(st.sampled_from(sorted(GOOD)) | st.text(max_size=8), min_size=1, max_size=3), value=values)
def test_recipe_mutations_fail_cleanly(path, value):
    _counted("recipe mutations")
    data = json.loads(json.dumps(GOOD))
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(node, dict) else node
        if not isinstance(node, dict):
            break
    if isinstance(node, dict):
        node[path[-1]] = value
    try:
        parse_recipe(data, DIGITS)
    except EdgepipeError as exc:
        assert "\n" not in str(exc)


@FUZZ
@given(text=st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_recipe_files_fail_cleanly(text):
    _counted("recipe files")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_bytes(text)
        try:
            load_recipe(path)
        except EdgepipeError as exc:
            assert "\n" not in str(exc)


@FUZZ
@given(data=st.binary(max_size=600) | values.map(lambda v: json.dumps(v).encode()))
def test_manifest_files_fail_cleanly(data):
    _counted("manifest files")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "manifest.json").write_bytes(data)
        try:
            read_manifest(Path(tmp))
            verify(Path(tmp))
        except EdgepipeError:
            pass


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, len(TINY) - 1), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.integers(0, len(TINY)))
def test_mutated_model_files_fail_cleanly(flips, cut):
    _counted("model files")
    data = bytearray(TINY)
    for pos, byte in flips:
        data[pos] = byte
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        path.write_bytes(bytes(data[:cut] if cut % 3 == 0 else data))
        for loader in (check_onnx_file, inspect_model):
            try:
                loader(path)
            except EdgepipeError as exc:
                assert "\n" not in str(exc)


def test_zz_report_fuzz_counts():
    # Runs last in this module: the counts show the fuzzers really ran.
    assert all(COUNT.get(name, 0) >= min(EXAMPLES, 50) for name in ("recipe mutations", "recipe files", "manifest files", "model files")), COUNT
    print(f"fuzz cases run: {COUNT} (total {sum(COUNT.values())})")
