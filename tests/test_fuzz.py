"""Fuzzing the loaders: mutated recipes, manifests and model files give clean errors, never crashes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import onnx
import pytest
import yaml
from conftest import DIGITS
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from edgepipe.core.artifact import read_manifest
from edgepipe.core.errors import BadInput, EdgepipeError
from edgepipe.pipeline.inspect_model import inspect_model
from edgepipe.pipeline.verify import verify
from edgepipe.recipe import Recipe, load_recipe, parse_recipe
from edgepipe.sources.export import check_onnx_file
from edgepipe.targets import TARGETS

EXAMPLES = int(os.environ.get("EDGEPIPE_FUZZ_EXAMPLES", "150"))
# The same examples on every run (a CI run must not go red on a case found by chance); EDGEPIPE_FUZZ_RANDOM=1 explores,
# and a case it finds goes in as an @example.
RANDOM = os.environ.get("EDGEPIPE_FUZZ_RANDOM") == "1"
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=not RANDOM)
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
    # Any mutation: a recipe, or one clean line; never another exception (which fails the test).
    try:
        recipe = parse_recipe(data, DIGITS)
    except EdgepipeError as exc:
        assert "\n" not in str(exc)
    else:  # accepted: no unknown key got through, and the recipe says what the mapping says
        assert set(data) <= RECIPE_KEYS and recipe.name == data["name"]


RECIPE_KEYS = set(Recipe.model_fields) - {"base_dir"}
TARGET_NAMES = sorted(TARGETS)


@FUZZ
@given(key=st.text(min_size=1, max_size=10).filter(lambda k: k not in RECIPE_KEYS), value=values,
       target=st.text(min_size=1, max_size=10).filter(lambda t: t not in TARGETS),
       drop=st.floats(max_value=-1e-6, allow_nan=False) | st.text(max_size=6).filter(lambda t: not _is_number(t)))
def test_invalid_recipes_are_rejected(key, value, target, drop):
    _counted("invalid recipes")
    for change in ({key: value}, {"targets": [target]}, {"accuracy": {"metric": "top1", "max_drop": drop}}):
        with pytest.raises(BadInput) as exc:
            parse_recipe({**json.loads(json.dumps(GOOD)), **change}, DIGITS)
        assert "\n" not in str(exc.value)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@FUZZ
@given(name=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,30}", fullmatch=True), drop=st.floats(0, 1),
       targets=st.lists(st.sampled_from(TARGET_NAMES), min_size=1, unique=True))
def test_valid_recipes_are_accepted_as_written(name, drop, targets):
    _counted("valid recipes")
    data = {**json.loads(json.dumps(GOOD)), "name": name, "targets": targets, "accuracy": {"metric": "top1", "max_drop": drop}}
    recipe = parse_recipe(data, DIGITS)
    assert recipe.name == name and recipe.accuracy.max_drop == drop and list(recipe.targets) == targets


@FUZZ
@given(text=st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_recipe_files_fail_cleanly(text):
    _counted("recipe files")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_bytes(text)
        try:
            data = yaml.safe_load(text.decode("utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError):
            data = None
        # A recipe needs a mapping with a name and a model, and the model's file (none in this empty folder).
        with pytest.raises(EdgepipeError) as exc:
            load_recipe(path)
        assert "\n" not in str(exc.value)
        assert isinstance(data, dict) or "mapping" in str(exc.value) or "YAML" in str(exc.value) or "UTF-8" in str(exc.value)


def test_the_demo_recipe_file_loads():
    assert load_recipe(DIGITS / "recipe.yaml").name == GOOD["name"]


def _is_manifest(value) -> bool:
    return isinstance(value, dict) and isinstance(value.get("files"), dict) and value.get("schema_version") == 1


@FUZZ
@given(data=st.binary(max_size=600) | values.map(lambda v: json.dumps(v).encode())
       | st.dictionaries(st.sampled_from(["files", "schema_version", "digest", "model_file"]), values, max_size=4)
       .map(lambda d: json.dumps({**d, "schema_version": 1}).encode()))
def test_manifest_files_fail_cleanly(data):
    _counted("manifest files")
    try:
        parsed = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        parsed = None
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "manifest.json").write_bytes(data)
        if not _is_manifest(parsed):
            with pytest.raises(EdgepipeError) as exc:
                read_manifest(Path(tmp))
            assert "\n" not in str(exc.value)
            return
        assert read_manifest(Path(tmp)) == parsed
        # A folder with nothing but a made-up manifest never verifies.
        try:
            checks = verify(Path(tmp))
        except EdgepipeError as exc:
            assert "\n" not in str(exc)
        else:
            assert not all(c.passed for c in checks), checks


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, len(TINY) - 1), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.integers(0, len(TINY)))
@example(flips=[(4, 21)], cut=1)  # the node's bytes become an unknown field: a graph whose output nothing produces
def test_mutated_model_files_fail_cleanly(flips, cut):
    _counted("model files")
    data = bytearray(TINY)
    for pos, byte in flips:
        data[pos] = byte
    data = bytes(data[:cut] if cut % 3 == 0 else data)
    try:
        parsed = onnx.ModelProto.FromString(data)
    except DecodeError:
        parsed = None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        path.write_bytes(data)
        for loader in (check_onnx_file, inspect_model):
            if data == TINY:
                loader(path)  # unchanged bytes (every flip wrote the byte that was there): accepted
                continue
            if parsed is None or not parsed.graph.node:
                with pytest.raises(EdgepipeError) as exc:  # not an ONNX model at all: rejected
                    loader(path)
                assert "\n" not in str(exc.value)
                continue
            try:
                info = loader(path)
            except EdgepipeError as exc:
                assert "\n" not in str(exc)
            else:
                if info is not None:  # what inspect reports is what the file holds
                    assert info["ir_version"] == parsed.ir_version and sum(info["ops"].values()) == len(parsed.graph.node)


def test_the_unmutated_model_file_is_accepted(tmp_path):
    (tmp_path / "m.onnx").write_bytes(TINY)
    check_onnx_file(tmp_path / "m.onnx")
    assert inspect_model(tmp_path / "m.onnx")["ops"] == {"Relu": 1}


def test_zz_report_fuzz_counts():
    # Runs last in this module: the counts show the fuzzers really ran.
    names = ("recipe mutations", "invalid recipes", "valid recipes", "recipe files", "manifest files", "model files")
    assert all(COUNT.get(name, 0) >= min(EXAMPLES, 50) for name in names), COUNT
    print(f"fuzz cases run: {COUNT} (total {sum(COUNT.values())})")
