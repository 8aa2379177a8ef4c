"""Sessions get their large weights as arrays beside a skeleton graph (tnopt/session_weights.py): the
same outputs, the caller's model untouched, and no protobuf encoding of the weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from helpers import init, make_model, run, tensor
from onnx import TensorProto, helper, numpy_helper

import tnopt.runtime as R
from tnopt.runtime import Runtime
from tnopt.session_weights import STAGED_MIN_BYTES, weightless_payload


def wide_net(seed=0) -> onnx.ModelProto:
    """x (N, 64) → Gemm 64→256 → Relu → MatMul 256→8 + int64 Reshape shape (small, stays inline)."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((256, 64)).astype(np.float32)
    b1 = rng.standard_normal(256).astype(np.float32)
    w2 = rng.standard_normal((256, 8)).astype(np.float16).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["m"], name="fc2"),
        helper.make_node("Reshape", ["m", "shape"], ["y"], name="reshape"),
    ]
    return make_model(
        nodes,
        [tensor("x", ["N", 64])],
        [tensor("y", ["N", 8])],
        [init("w1", w1), init("b1", b1), init("w2", w2), numpy_helper.from_array(np.array([-1, 8]), "shape")],
    )


def test_skeleton_moves_the_large_initializers_only_and_leaves_the_model_alone():
    model = wide_net()
    before = model.SerializeToString()
    payload, values = weightless_payload(model)
    assert model.SerializeToString() == before  # the caller's model is not modified
    assert sorted(values) == ["b1", "w1", "w2"]  # ≥ STAGED_MIN_BYTES; the 16-byte shape stays
    assert all(v.nbytes >= STAGED_MIN_BYTES for v in values.values())
    skeleton = onnx.ModelProto.FromString(payload)
    by_name = {t.name: t for t in skeleton.graph.initializer}
    for name, value in values.items():
        header = by_name[name]
        assert header.data_location == TensorProto.EXTERNAL and not header.raw_data
        assert tuple(header.dims) == value.shape
        original = next(t for t in model.graph.initializer if t.name == name)
        np.testing.assert_array_equal(value, onnx.numpy_helper.to_array(original))
    assert by_name["shape"].raw_data  # small tensors stay in the graph
    # Everything else of the model is kept: opsets, IR version, inputs, outputs, nodes.
    assert skeleton.ir_version == model.ir_version and skeleton.opset_import == model.opset_import
    assert skeleton.graph.node == model.graph.node and skeleton.graph.input == model.graph.input
    assert len(payload) < sum(v.nbytes for v in values.values()) / 10


def test_session_from_skeleton_gives_the_plain_sessions_outputs_and_encodes_no_weights(monkeypatch):
    model = wide_net()
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    payloads = []

    class Spy(ort.InferenceSession):
        def __init__(self, payload, *args, **kwargs):
            payloads.append(payload)
            super().__init__(payload, *args, **kwargs)

    monkeypatch.setattr(R.ort, "InferenceSession", Spy)
    got = Runtime("cpu").run(model, {"x": x})[0]
    monkeypatch.undo()
    np.testing.assert_array_equal(got, run(model, {"x": x})[0])  # the same bytes reach the same kernels
    weights = sum(t.ByteSize() for t in model.graph.initializer)
    assert len(payloads) == 1 and len(payloads[0]) < weights / 10


def test_the_weights_outlive_everything_but_the_session():
    """onnxruntime reads staged weights in place: the session keeps them, so a model dropped (and
    its arrays collected) right after the session opens still runs correctly."""
    import gc

    x = np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)
    expected = run(wide_net(), {"x": x})[0]
    session = Runtime("cpu").session(wide_net())
    gc.collect()
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], expected)


def test_a_model_without_large_initializers_is_serialized_as_it_is():
    model = wide_net()
    for t in model.graph.initializer:
        if t.name != "shape":
            # typed-field data (float_data) is not moved: only raw_data is viewed without encoding
            values = onnx.numpy_helper.to_array(t)
            t.ClearField("raw_data")
            t.float_data.extend(values.astype(np.float32).ravel().tolist())
    assert weightless_payload(model) is None
    x = np.ones((2, 64), np.float32)
    np.testing.assert_allclose(Runtime("cpu").run(model, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-6)


def test_a_skeleton_over_the_protobuf_limit_goes_through_files(monkeypatch):
    model = wide_net()
    used = []
    monkeypatch.setattr(R, "SESSION_BYTES_LIMIT", 10)
    original = R.Runtime._session_from_files
    monkeypatch.setattr(
        R.Runtime, "_session_from_files", lambda self, *a, **k: used.append(1) or original(self, *a, **k)
    )
    x = np.ones((2, 64), np.float32)
    np.testing.assert_allclose(Runtime("cpu").run(model, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-6)
    assert used == [1]
