"""targets/ortbytes.py: a .ort file's kernel type-string table re-written in sorted order, whatever order it came in."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort

from edgepipe.targets import ortbytes
from edgepipe.targets.ortbytes import canonical_ort


def _op_ids(data: bytes) -> list[str]:
    """The resolver's op ids in file order, read with ORT's own flatbuffers bindings."""
    import onnxruntime.tools.ort_format_model  # noqa: F401 - puts ort_flatbuffers_py on the path
    import ort_flatbuffers_py.fbs as fbs

    resolver = fbs.InferenceSession.InferenceSession.GetRootAs(bytearray(data), 0).KernelTypeStrResolver()
    return [resolver.OpKernelTypeStrArgs(i).OpId().decode() for i in range(resolver.OpKernelTypeStrArgsLength())]


def _reordered(data: bytes) -> bytes:
    """``data`` with its resolver written in reverse order (each op's type strings reversed too): what a converter
    whose hash map iterates differently writes."""
    session = ortbytes._parse(data)
    backwards = [(op, tuple(reversed(kts))) for op, kts in reversed(session["entries"])]
    return ortbytes._build(data, {**session, "entries": backwards})


def _outputs(data: bytes) -> list[np.ndarray]:
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    feeds = {i.name: np.random.default_rng(0).standard_normal(i.shape).astype(np.float32) for i in session.get_inputs()}
    return session.run(None, feeds)


def test_two_resolver_orders_give_one_file_that_runs_as_the_converted_one(digits_build, caplog):
    published = (digits_build / "mobile" / "model.ort").read_bytes()
    other = _reordered(published)
    assert _op_ids(other) != _op_ids(published) and sorted(_op_ids(other)) == sorted(_op_ids(published))
    assert other != published
    with caplog.at_level(logging.WARNING, logger=ortbytes.__name__):
        canonical = canonical_ort(other)
        assert canonical == canonical_ort(published) == published  # the build publishes the canonical bytes
    assert not caplog.records  # re-written, not handed back as it came
    assert _op_ids(canonical) == sorted(_op_ids(canonical))
    for want, got in zip(_outputs(other), _outputs(canonical), strict=True):
        np.testing.assert_array_equal(want, got)


def test_canonical_is_idempotent(digits_build, caplog):
    with caplog.at_level(logging.WARNING, logger=ortbytes.__name__):
        once = canonical_ort(_reordered((digits_build / "mobile" / "model.ort").read_bytes()))
        assert canonical_ort(once) == once
    assert not caplog.records


def test_a_buffer_that_is_no_ort_file_comes_back_unchanged(digits_build, caplog):
    ort_file = (digits_build / "mobile" / "model.ort").read_bytes()
    onnx_file = (digits_build / "cpu" / "model.onnx").read_bytes()
    truncated = ort_file[: len(ort_file) // 2]  # "ORTM" still there, offsets point past the end
    for data in (onnx_file, truncated, b"", b"\0" * 4 + b"ORTM" + b"\0" * 8):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=ortbytes.__name__):
            assert canonical_ort(data) is data
        assert [r.levelno for r in caplog.records] == [logging.WARNING]
