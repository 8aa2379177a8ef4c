"""File level: what the input and output files are, what is written, and how failures are reported."""

import json

import numpy as np
import onnx
import pytest
from contract import run_case, sha
from helpers import cli
from tnopt.passes import METHODS


def test_unreadable_inputs(tmp_path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    run_case(tmp_path, empty, expect=2, fragment="empty.onnx")
    tensor_file = tmp_path / "tensor.onnx"
    tensor_file.write_bytes(onnx.numpy_helper.from_array(np.ones(3, np.float32)).SerializeToString())
    run_case(tmp_path, tensor_file, expect=2, fragment="tensor.onnx")
    folder = tmp_path / "folder.onnx"
    folder.mkdir()
    run_case(tmp_path, folder, expect=2, fragment="is a directory")


def test_output_is_a_directory(tmp_path, model_path):
    target = tmp_path / "outdir"
    target.mkdir()
    result = cli(model_path, "-o", target, "-q", "--no-cache")
    assert result.returncode == 2 and "is a directory" in result.stderr
    assert list(target.iterdir()) == []


def test_report_is_strict_json_with_provenance_and_disk_sizes(tmp_path, model_path):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    run_case(tmp_path, model_path, "--rank-ratio", "0.25", "--report", report, output=out, expect=0)
    text = report.read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    run = data["run"]
    assert run["tnopt_version"] and run["command"][0] == "tnopt" and str(model_path) in run["command"]
    assert run["input"] == {"path": str(model_path), "sha256": sha(model_path)}
    assert run["output"] == {"path": str(out), "sha256": sha(out)}
    assert data["before"]["file_bytes"] == model_path.stat().st_size
    assert data["after"]["file_bytes"] == out.stat().st_size
    for layer in data["layers"]:
        assert layer["bytes_before"] > 0 and layer["bytes_after"] > 0


def test_report_json_writes_null_for_non_finite_numbers():
    from tnopt.report import ModelSummary, Report

    report = Report("m", "cpu", ModelSummary({}, 1, 1, 1), metrics={"rel-l2": float("nan")})
    report.search = {"curve": [{"drop": float("inf")}], "x": np.float32("-inf")}
    data = json.loads(report.to_json(), parse_constant=lambda c: pytest.fail(c))
    assert data["metrics"]["rel-l2"] is None and data["search"]["curve"][0]["drop"] is None
    assert data["search"]["x"] is None


def test_internal_failure_is_exit_4_naming_layer_and_method(tmp_path, model_path, monkeypatch):
    def broken(weight, rank, stats=None):
        raise ValueError("operands could not be broadcast")

    monkeypatch.setattr(METHODS["svd"], "decompose", broken)
    out = tmp_path / "out.onnx"
    result = cli(model_path, "-o", out, "-q", "--no-cache", "--method", "svd")
    assert result.returncode == 4
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tnopt: internal error:"), result.stderr
    assert "layer fc1" in lines[0] and "svd" in lines[0] and "--debug" in lines[0]
    assert not out.exists()
    debug = cli(model_path, "-o", out, "-q", "--no-cache", "--method", "svd", "--debug")
    assert debug.returncode == 4 and "Traceback" in debug.stderr and "broadcast" in debug.stderr


def test_own_graph_failing_in_onnxruntime_is_internal_not_bad_input(tmp_path, model_path, monkeypatch):
    svd = METHODS["svd"]

    def bad_build(emit, layer, factors):
        # An op onnxruntime has never heard of, in place of the layer.
        emit.op("NoSuchOp", "broken", [emit.data_input], final=True)

    monkeypatch.setattr(svd, "build", bad_build)
    result = cli(model_path, "-o", tmp_path / "out.onnx", "-q", "--no-cache", "--method", "svd")
    assert result.returncode == 4, result.stderr
    assert "internal error" in result.stderr and "fc1 (svd)" in result.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_im2col_patches_reproduce_the_convolution():
    # The data-aware cut-o moment's im2col, in numpy: patches · W equals onnxruntime's Conv.
    from types import SimpleNamespace

    from helpers import init, make_model, run, tensor
    from onnx import helper

    from tnopt.layer_rows import im2col_rows

    rng = np.random.default_rng(6)
    weight = rng.standard_normal((5, 3, 3, 2)).astype(np.float32)
    attrs = {"kernel_shape": (3, 2), "strides": (2, 1), "dilations": (1, 2), "pads": (1, 0, 0, 1)}
    conv = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], **{k: list(v) for k, v in attrs.items()})],
        [tensor("x", [2, 3, 9, 8])],
        [tensor("y", 4)],
        [init("w", weight)],
    )
    x = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
    expected = run(conv, {"x": x})[0]
    rows = im2col_rows(SimpleNamespace(attr=attrs.get), x) @ weight.reshape(5, -1).T
    got = rows.reshape(2, expected.shape[2], expected.shape[3], 5).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
