"""Every input layout: batch axes read from symbolic dims (a recurrent state [layers, N, H]),
0-d and constant inputs fed whole, dtypes kept, .npy data, fixed-batch-1 models run in real
batches, symbolic dims bound from the data; and external-data models in and out."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from helpers import init, make_model, planted_matrix, run, tensor
from onnx import TensorProto, helper, numpy_helper

from tnopt import io
from tnopt.data import Feeds, InputSpec, dataset_from_arrays, infer_batch_axes, load_npz
from tnopt.errors import DataError
from tnopt.pipeline import compress, summarize
from tnopt.runtime import Runtime, batched_working_model

CHUNK, HIDDEN, STATE, CLASSES = 48, 32, 16, 4


def streaming_gru(seed=0) -> onnx.ModelProto:
    """A streaming voice-activity-style model: a chunk x [N, 48], a recurrent state [1, N, 16]
    (batch on axis 1) and a 0-d int64 sample rate that scales the chunk."""
    rng = np.random.default_rng(seed)
    w_in = planted_matrix(CHUNK, HIDDEN, 6, seed=seed) / 4
    w_out = planted_matrix(STATE, CLASSES * 8, 3, seed=seed + 1) / 3
    gru_w = rng.standard_normal((1, 3 * STATE, HIDDEN)).astype(np.float32) * 0.3
    gru_r = rng.standard_normal((1, 3 * STATE, STATE)).astype(np.float32) * 0.3
    nodes = [
        helper.make_node("Cast", ["sr"], ["sr_f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["sr_f", "sr_ref"], ["sr_scale"]),
        helper.make_node("Mul", ["x", "sr_scale"], ["x_scaled"]),
        helper.make_node("MatMul", ["x_scaled", "w_in"], ["h"], name="encoder"),
        helper.make_node("Tanh", ["h"], ["h_act"]),
        helper.make_node("Unsqueeze", ["h_act", "axis0"], ["seq"]),
        helper.make_node(
            "GRU", ["seq", "gru_w", "gru_r", "", "", "state"], ["y", "state_out"], hidden_size=STATE
        ),
        helper.make_node("Squeeze", ["state_out", "axis0"], ["last"]),
        helper.make_node("MatMul", ["last", "w_out"], ["logits"], name="decoder"),
    ]
    return make_model(
        nodes,
        [
            tensor("x", ["N", CHUNK]),
            tensor("state", [1, "N", STATE]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [tensor("logits", ["N", CLASSES * 8]), tensor("state_out", [1, "N", STATE])],
        [
            init("w_in", w_in),
            init("w_out", w_out),
            init("gru_w", gru_w),
            init("gru_r", gru_r),
            init("sr_ref", np.array(16000.0)),
            numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        ],
    )


def streaming_data(n=96, seed=1):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((n, CHUNK)).astype(np.float32),
        "state": (rng.standard_normal((1, n, STATE)) * 0.5).astype(np.float32),
        "sr": np.array(16000, np.int64),
    }


def test_batch_axes_come_from_the_symbolic_dims():
    specs = [
        InputSpec("x", np.dtype(np.float32), ("N", 48)),
        InputSpec("state", np.dtype(np.float32), (2, "N", 128)),
        InputSpec("sr", np.dtype(np.int64), ()),
    ]
    assert infer_batch_axes(specs) == {"x": 0, "state": 1, "sr": None}
    assert infer_batch_axes(specs, {"state": None})["state"] is None
    tokens = [
        InputSpec("input_ids", np.dtype(np.int64), ("batch", "seq")),
        InputSpec("attention_mask", np.dtype(np.int64), ("batch", "seq")),
    ]
    assert infer_batch_axes(tokens) == {"input_ids": 0, "attention_mask": 0}
    with pytest.raises(DataError, match="state.*no axis 3"):
        infer_batch_axes(specs, {"state": 3})
    with pytest.raises(DataError, match="'nope'"):
        infer_batch_axes(specs, {"nope": 0})


def test_state_on_axis_1_and_0d_input_run_batch_by_batch():
    model = streaming_gru()
    data = dataset_from_arrays(streaming_data(), [*_specs(model)], "mem")
    assert len(data) == 96 and data.inputs.axes == {"x": 0, "state": 1, "sr": None}
    runtime = Runtime("cpu", batch_size=10)  # 10 batches, the last one short
    logits, state_out = runtime.run(model, data.inputs)
    arrays = streaming_data()
    expected_logits, expected_state = run(model, arrays)
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-6)
    # Outputs come back sample-major: the state's batch axis (1) moved to axis 0.
    np.testing.assert_allclose(state_out, np.moveaxis(expected_state, 1, 0), rtol=1e-5, atol=1e-6)
    half = data.subset(slice(0, 7))
    assert half.inputs["sr"].shape == () and half.inputs["state"].shape == (7, 1, STATE)


def _specs(model):
    from tnopt.data import input_specs

    return input_specs(model)


def test_errors_name_the_input_and_the_axis(tmp_path):
    specs = _specs(streaming_gru())
    arrays = streaming_data(8)
    bad = dict(arrays, state=arrays["state"][:, :5])
    with pytest.raises(DataError, match=r"inputs disagree.*'state' has 5 on axis 1"):
        dataset_from_arrays(bad, specs, "d.npz")
    bad = dict(arrays, state=np.zeros((2, 8, STATE), np.float32))
    with pytest.raises(DataError, match=r"input 'state' axis 0 has size 2, the model expects 1"):
        dataset_from_arrays(bad, specs, "d.npz")
    bad = dict(arrays, x=(arrays["x"] * 100).astype(np.uint8))
    with pytest.raises(DataError, match=r"input 'x' is float32 but its array is uint8"):
        dataset_from_arrays(bad, specs, "d.npz")
    bad = dict(arrays, sr=np.full(8, 16000, np.int64))
    with pytest.raises(DataError, match=r"'sr' is 0-d"):
        dataset_from_arrays(bad, specs, "d.npz")
    bad = dict(arrays, sr=np.array(16000.0))
    with pytest.raises(DataError, match=r"input 'sr' is int64 but its array is float64"):
        dataset_from_arrays(bad, specs, "d.npz")
    # Integer data keeps an integer input's dtype (int32 ids for an int64 input are widened, not floated).
    ok = dataset_from_arrays(dict(arrays, sr=np.array(8000, np.int32)), specs, "d.npz")
    assert ok.inputs["sr"].dtype == np.int64 and ok.inputs["sr"] == 8000


def test_npy_for_a_single_input_model(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.ones((5, 4), np.float64))
    data = load_npz(path, [InputSpec("x", np.dtype(np.float32), ("N", 4))])
    assert len(data) == 5 and data.inputs["x"].dtype == np.float32
    with pytest.raises(DataError, match="a .npy holds one array, the model has 2 inputs"):
        load_npz(
            path, [InputSpec("a", np.dtype(np.float32), ("N",)), InputSpec("b", np.dtype(np.float32), ("N",))]
        )


def test_streaming_gru_budgeted_with_data_from_the_cli(tmp_path):
    """The issue's streaming model: state batch on axis 1, a 0-d int64 input, --budget 1% --data."""
    model_path, data_path = tmp_path / "vad.onnx", tmp_path / "calib.npz"
    out, report_path = tmp_path / "small.onnx", tmp_path / "r.json"
    onnx.save(streaming_gru(), model_path)
    np.savez(data_path, **streaming_data(512))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tnopt",
            model_path,
            "-o",
            out,
            "--budget",
            "1%",
            "--data",
            data_path,
            "--report",
            report_path,
            "-q",
            "--no-cache",
            "--latency-batch",
            "4",
            "--no-latency-guard",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert report["batching"]["batch_axes"] == {"x": 0, "state": 1, "sr": None}
    assert {layer["name"] for layer in report["layers"] if layer["decision"] == "rewritten"} >= {"encoder"}
    assert report["budget"]["drop_evaluation"] <= 0.01
    assert report["latency"]["batch"] == 4 and report["latency"]["rounds"] >= 15
    assert [s["stage"] for s in report["stages"]][:2] == ["load", "data"]
    assert all(s["peak_rss_mb"] > 0 for s in report["stages"])
    small = onnx.load(out)
    assert [i.name for i in small.graph.input] == ["x", "state", "sr"]
    assert small.graph.input[1].type.tensor_type.shape.dim[1].dim_param == "N"
    arrays = streaming_data(6, seed=5)
    got, want = run(small, arrays), run(streaming_gru(), arrays)
    assert got[1].shape == want[1].shape == (1, 6, STATE)


def fixed_batch_net(reshape_to_one: bool = False) -> onnx.ModelProto:
    """Input fixed at [1, 3, 8, 8]: Conv → Relu → Flatten (or a Reshape to [1, -1], which folds the
    batch and cannot be batched) → Gemm."""
    rng = np.random.default_rng(3)
    conv_w = rng.standard_normal((16, 3, 3, 3)).astype(np.float32) * 0.3
    fc_w = planted_matrix(16 * 36, 10, 4, seed=4) / 30
    flatten = (
        helper.make_node("Reshape", ["r", "shape"], ["f"])
        if reshape_to_one
        else helper.make_node("Flatten", ["r"], ["f"], axis=1)
    )
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"]),
        flatten,
        helper.make_node("Gemm", ["f", "fc_w"], ["y"], name="fc"),
    ]
    return make_model(
        nodes,
        [tensor("x", [1, 3, 8, 8])],
        [tensor("y", [1, 10])],
        [
            init("conv_w", conv_w),
            init("fc_w", fc_w),
            numpy_helper.from_array(np.array([1, -1], np.int64), "shape"),
        ],
    )


def test_fixed_batch_1_runs_in_real_batches_with_one_by_one_outputs():
    model = fixed_batch_net()
    x = np.random.default_rng(0).standard_normal((24, 3, 8, 8)).astype(np.float32)
    runtime = Runtime("cpu", batch_size=8)
    working, note = batched_working_model(model, Feeds({"x": x}), runtime)
    assert working is not model and "dynamic-batch copy" in note
    session = runtime.session(working)
    assert session.get_inputs()[0].shape[0] == "tnopt_batch"
    batched = runtime.run(working, {"x": x})[0]
    one_by_one = np.concatenate([run(model, {"x": x[i : i + 1]})[0] for i in range(len(x))])
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-5, atol=1e-6)
    # Compressed in batches, saved with the fixed batch-1 interface, outputs equal one-by-one runs of it.
    small, report = compress(model, rank_ratio=0.5, data={"x": x}, provider="cpu")
    assert "dynamic-batch copy" in report.batching["fixed_batch"]
    assert small.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert small.graph.output[0].type.tensor_type.shape.dim[0].dim_value == 1
    compressed_batched = runtime.run(working, {"x": x})[0]  # the working copy still runs batched
    compressed_one = np.concatenate([run(small, {"x": x[i : i + 1]})[0] for i in range(len(x))])
    assert compressed_one.shape == compressed_batched.shape
    assert report.rewritten


def test_fixed_batch_that_cannot_batch_runs_one_by_one():
    model = fixed_batch_net(reshape_to_one=True)
    x = np.random.default_rng(0).standard_normal((6, 3, 8, 8)).astype(np.float32)
    runtime = Runtime("cpu")
    working, note = batched_working_model(model, Feeds({"x": x}), runtime)
    assert working is model and "run 1 at a time" in note
    outputs = runtime.run(model, {"x": x})[0]
    np.testing.assert_allclose(outputs[2], run(model, {"x": x[2:3]})[0][0], rtol=1e-6)


def test_flops_are_counted_at_the_data_shapes():
    conv_w = np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32)
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        [tensor("x", ["N", 3, "H", "W"])],
        [tensor("y", ["N", 8, "H", "W"])],
        [init("w", conv_w)],
    )
    assert summarize(model).flops == 2 * 8 * 3 * 9  # symbolic dims counted as 1
    feeds = Feeds({"x": np.zeros((2, 3, 20, 30), np.float32)})
    assert summarize(model, feeds).flops == 2 * 8 * 3 * 9 * 20 * 30


def _digest(*paths):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def test_external_data_model_in_external_data_model_out(tmp_path):
    from tnopt.pipeline import compress as _compress  # noqa: F401 (the CLI below is what is tested)

    source = fixed_batch_net()
    model_path = tmp_path / "in.onnx"
    onnx.save_model(
        source,
        model_path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="in.weights",
        size_threshold=0,
    )
    inputs_before = _digest(model_path, tmp_path / "in.weights")
    out = tmp_path / "out.onnx"
    result = subprocess.run(
        [sys.executable, "-m", "tnopt", model_path, "-o", out, "--rank-ratio", "0.5", "-q"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert _digest(model_path, tmp_path / "in.weights") == inputs_before  # input untouched
    assert io.external_data_files(out) == ["out.onnx.data"]
    assert (tmp_path / "out.onnx.data").stat().st_size > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left over
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    small = onnx.load(out)  # external weights resolved beside it
    assert np.isfinite(run(small, {"x": x})[0]).all()
    # A second run over the same output replaces the pair and leaves no stale weights behind.
    result = subprocess.run(
        [sys.executable, "-m", "tnopt", model_path, "-o", out, "--rank-ratio", "0.25", "-q"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    files = io.external_data_files(out)
    assert len(files) == 1 and (tmp_path / files[0]).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["in.onnx", "in.weights", "out.onnx", files[0]]
    )


def test_big_models_get_sessions_from_files(monkeypatch):
    """Above the protobuf limit a session is opened from a file with external data (the limit is
    lowered here: a real 2 GiB model does not fit this test's time)."""
    import tnopt.runtime as R

    model = fixed_batch_net()
    monkeypatch.setattr(R, "SESSION_BYTES_LIMIT", 1000)
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(Runtime("cpu").run(model, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-6)


def test_missing_external_data_is_a_one_line_error(tmp_path):
    model_path = tmp_path / "in.onnx"
    onnx.save_model(
        fixed_batch_net(), model_path, save_as_external_data=True, location="w.bin", size_threshold=0
    )
    (tmp_path / "w.bin").unlink()
    result = subprocess.run(
        [sys.executable, "-m", "tnopt", model_path, "-o", tmp_path / "o.onnx", "--rank-ratio", "0.5"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "external data" in result.stderr
