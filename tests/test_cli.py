"""The command line: bad input gives one line and exit 2, never a traceback or a partial file."""

import os

import numpy as np
import pytest
from helpers import cli, init, make_model, planted_matrix, tensor
from onnx import helper

tnopt = cli  # in process, through main(argv): see tests/test_contract_interruption.py for real processes


@pytest.fixture
def small_model(tmp_path):
    w1 = planted_matrix(32, 48, 8, seed=1)
    w2 = planted_matrix(48, 10, 10, seed=2)
    model = make_model(
        [
            helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc2"),
        ],
        [tensor("x", ["N", 32])],
        [tensor("y", ["N", 10])],
        [init("w1", w1), init("w2", w2)],
    )
    path = tmp_path / "small.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def assert_one_line_error(result, fragment):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tnopt: error:"), result.stderr
    assert "Traceback" not in result.stderr
    assert fragment in lines[0], lines[0]


def test_compress_writes_smaller_model_and_report(small_model, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    before = small_model.read_bytes()
    result = tnopt(small_model, "-o", out, "--rank-ratio", "0.25", "--report", report)
    assert result.returncode == 0, result.stderr
    assert out.exists() and out.stat().st_size < small_model.stat().st_size
    assert small_model.read_bytes() == before  # input untouched
    assert "params" in result.stdout and "Gemm" in result.stdout
    import json

    data = json.loads(report.read_text())
    assert {layer["name"] for layer in data["layers"]} == {"fc1", "fc2"}
    assert all(layer["decision"] == "rewritten" for layer in data["layers"])
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_inspect_lists_layers(small_model):
    result = tnopt("inspect", small_model)
    assert result.returncode == 0, result.stderr
    assert "fc1" in result.stdout and "fc2" in result.stdout and "candidate" in result.stdout


def test_missing_file(tmp_path):
    assert_one_line_error(tnopt(tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx"), "no such file")
    assert not (tmp_path / "o.onnx").exists()


def test_bytes_that_are_not_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf at all \x00\xff\xfe" * 10)
    assert_one_line_error(tnopt(bad, "-o", tmp_path / "o.onnx"), "bad.onnx")
    assert not (tmp_path / "o.onnx").exists()


def test_truncated_model(small_model, tmp_path):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(small_model.read_bytes()[: small_model.stat().st_size // 2])
    assert_one_line_error(tnopt(truncated, "-o", tmp_path / "o.onnx"), "truncated.onnx")
    assert not (tmp_path / "o.onnx").exists()


def test_output_equal_to_input_is_refused(small_model):
    before = small_model.read_bytes()
    assert_one_line_error(tnopt(small_model, "-o", small_model), "overwrite the input")
    assert small_model.read_bytes() == before


def test_output_equal_to_input_through_another_spelling(small_model):
    other = small_model.parent / "." / small_model.name
    assert_one_line_error(tnopt(small_model, "-o", other), "overwrite the input")


def test_unwritable_output_directory(small_model, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            # root ignores directory modes; /proc refuses new files even to root
            result = tnopt(small_model, "-o", "/proc/tnopt-test-output.onnx")
            assert_one_line_error(result, "not writable")
            assert not os.path.exists("/proc/tnopt-test-output.onnx")
        else:
            assert_one_line_error(tnopt(small_model, "-o", locked / "o.onnx"), "not writable")
            assert not os.listdir(locked)
    finally:
        locked.chmod(0o700)


def test_missing_output_directory(small_model, tmp_path):
    assert_one_line_error(tnopt(small_model, "-o", tmp_path / "nodir" / "o.onnx"), "does not exist")


def test_no_candidate_layers_exit_2_nothing_written(tmp_path):
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"])], [tensor("x", ["N", 4])], [tensor("y", ["N", 4])]
    )
    path = tmp_path / "relu.onnx"
    path.write_bytes(model.SerializeToString())
    assert_one_line_error(tnopt(path, "-o", tmp_path / "o.onnx"), "no Conv, Gemm or constant-weight MatMul")
    assert not (tmp_path / "o.onnx").exists()


def test_attention_only_matmuls_are_no_candidates(tmp_path):
    model = make_model(
        [helper.make_node("MatMul", ["q", "k"], ["y"])],
        [tensor("q", ["N", 4, 8]), tensor("k", ["N", 8, 4])],
        [tensor("y", 3)],
    )
    path = tmp_path / "attn.onnx"
    path.write_bytes(model.SerializeToString())
    assert_one_line_error(tnopt(path, "-o", tmp_path / "o.onnx"), "no Conv, Gemm")


def test_bad_data_file(small_model, tmp_path):
    data = tmp_path / "d.npz"
    np.savez(data, wrong=np.zeros((4, 7), np.float32), other=np.zeros((4, 7), np.float32))
    assert_one_line_error(
        tnopt(small_model, "-o", tmp_path / "o.onnx", "--data", data), "no array for model input"
    )
    assert not (tmp_path / "o.onnx").exists()


def test_provider_cuda_without_cuda(small_model, tmp_path):
    from tnopt.runtime import cuda_works

    if cuda_works()[0]:
        pytest.skip("this machine has a working CUDA provider")
    assert_one_line_error(
        tnopt(small_model, "-o", tmp_path / "o.onnx", "--provider", "cuda"), "--provider cuda"
    )
    assert not (tmp_path / "o.onnx").exists()


def test_list_methods():
    result = tnopt("--list-methods")
    assert result.returncode == 0
    assert "tucker2" in result.stdout and "svd" in result.stdout


def test_bad_exclude_regex_is_one_line(small_model, tmp_path):
    assert_one_line_error(
        tnopt(small_model, "-o", tmp_path / "o.onnx", "--exclude", "fc(1"), "not a regular expression"
    )


def test_exclude_and_min_layer_params_leave_layers_dense(small_model, tmp_path):
    import json

    report = tmp_path / "r.json"
    result = tnopt(
        small_model,
        "-o",
        tmp_path / "o.onnx",
        "--rank-ratio",
        "0.25",
        "--exclude",
        "^fc2$",
        "--report",
        report,
        "-q",
    )
    assert result.returncode == 0, result.stderr
    layers = {layer["name"]: layer for layer in json.loads(report.read_text())["layers"]}
    assert layers["fc1"]["decision"] == "rewritten"
    assert layers["fc2"]["decision"] == "skipped" and "--exclude" in layers["fc2"]["reason"]
    result = tnopt(
        small_model, "-o", tmp_path / "o.onnx", "--rank-ratio", "0.25", "--min-layer-params", "10**9"
    )
    assert result.returncode == 2  # not an integer: argparse's one-line error
    result = tnopt(
        small_model, "-o", tmp_path / "o.onnx", "--rank-ratio", "0.25", "--min-layer-params", "1000000"
    )
    assert_one_line_error(result, "none of the 2 layers can be factorized")


def test_output_file_gets_the_umask_mode(small_model, tmp_path):
    out = tmp_path / "out.onnx"
    result = tnopt(small_model, "-o", out, "--rank-ratio", "0.5", "-q")
    assert result.returncode == 0, result.stderr
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o666 & ~umask


def test_one_hot_labels_are_class_indices(tmp_path):
    from tnopt.data import InputSpec, load_npz

    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((3, 4), np.float32), labels=np.eye(3)[[2, 0, 1]])
    data = load_npz(path, [InputSpec("x", np.dtype(np.float32), ("N", 4))])
    assert data.labels.tolist() == [2, 0, 1]
