"""Options: every value a user can type is used as meant or refused in one line before any work."""

import time

import numpy as np
import onnx
import pytest
from contract import mlp, run_case, save
from helpers import cli

import tnopt
from tnopt.budget import parse_budget
from tnopt.errors import TnoptError


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--rank-ratio", "0"], "--rank-ratio must be in (0, 1]"),
        (["--rank-ratio", "-0.5"], "--rank-ratio must be in (0, 1]"),
        (["--rank-ratio", "1.5"], "--rank-ratio must be in (0, 1]"),
        (["--rank-ratio", "nan"], "--rank-ratio must be a number"),
        (["--rank-ratio", "abc"], "--rank-ratio"),
        (["--energy", "1.5"], "--energy must be in (0, 1]"),
        (["--energy", "0"], "--energy must be in (0, 1]"),
        (["--energy", "inf"], "--energy must be a number"),
        (["--method", "mpo", "--mpo-cores", "0"], "--mpo-cores must be between 2"),
        (["--method", "mpo", "--mpo-cores", "1"], "--mpo-cores must be between 2"),
        (["--method", "mpo", "--mpo-cores", "-3"], "--mpo-cores must be between 2"),
        (["--method", "mpo", "--mpo-cores", "99"], "--mpo-cores must be between 2"),
        (["--method", "nope"], "unknown method(s) 'nope'"),
        (["--method", "svd,"], "unknown method(s) ''"),
        (["--min-layer-params", "-1"], "--min-layer-params must be ≥ 0"),
        (["--seed", "-1"], "--seed must be ≥ 0"),
        (["--exclude", "fc(1"], "not a regular expression"),
        (["--rank-ratio", "0.5", "--energy", "0.9"], "not allowed with argument"),
        (["--objective", "speed"], "invalid choice"),
    ],
)
def test_bad_option_values_are_one_line_errors(tmp_path, model_path, args, fragment):
    run_case(tmp_path, model_path, *args, expect=2, fragment=fragment)


@pytest.mark.parametrize(
    "budget, fragment",
    [
        ("1", "has no unit: write 1% (or 1pp)"),
        ("0.5", "or 0.005 as a fraction"),
        ("200%", "100% or more"),
        ("100pp", "100% or more"),
        ("nan%", "not a finite number"),
        ("inf", "not a finite number"),
        ("-1%", "is negative"),
        ("-0.05", "is negative"),
        ("one", "is not a number"),
    ],
)
def test_bad_budgets_are_refused_before_reading_data(tmp_path, model_path, labelled, budget, fragment):
    run_case(tmp_path, model_path, f"--budget={budget}", "--data", labelled, expect=2, fragment=fragment)


def test_pp_is_absolute_only(tmp_path, model_path, labelled):
    run_case(
        tmp_path,
        model_path,
        "--budget",
        "1pp",
        "--drop-type",
        "relative",
        "--data",
        labelled,
        expect=2,
        fragment="'pp' is an absolute drop",
    )


def test_budget_spellings_mean_the_same():
    assert parse_budget("1%") == parse_budget("0.01") == parse_budget("1pp") == parse_budget(0.01)
    assert parse_budget("1 %") == (0.01, "absolute")
    assert parse_budget({"max_drop": "2%", "drop_type": "relative"}) == (0.02, "relative")
    assert parse_budget("0.05") == (0.05, "absolute")  # below 0.1 a bare number is a fraction
    assert parse_budget("0") == (0.0, "absolute")
    with pytest.raises(TnoptError, match="no unit"):
        parse_budget(0.1)
    with pytest.raises(TnoptError, match="drop-type"):
        parse_budget({"max_drop": 0.01, "drop_type": "percent"})


def test_budget_needs_data(tmp_path, model_path):
    run_case(tmp_path, model_path, "--budget", "1%", expect=2, fragment="--budget needs --data")


def test_api_refuses_two_rank_rules_and_bad_values(tmp_path):
    model = mlp()
    with pytest.raises(TnoptError, match="one rank rule, not --rank-ratio and --budget"):
        tnopt.compress(model, rank_ratio=0.5, budget=0.01, data={"x": np.ones((4, 32), np.float32)})
    with pytest.raises(TnoptError, match="--rank-ratio must be"):
        tnopt.compress(model, rank_ratio=True)
    with pytest.raises(TnoptError, match="--mpo-cores must be an integer"):
        tnopt.compress(model, mpo_cores=2.5)
    with pytest.raises(TnoptError, match="--provider"):
        tnopt.compress(model, provider="tpu")
    with pytest.raises(TnoptError, match="--cache must be a directory path"):
        tnopt.compress(model, cache_dir=True)


def test_cache_that_is_a_file(tmp_path, model_path):
    blocker = tmp_path / "cachefile"
    blocker.write_text("x")
    result = cli(model_path, "-o", tmp_path / "o.onnx", "-q", "--cache", blocker)
    assert result.returncode == 2 and "is a file, not a directory" in result.stderr
    result = cli(model_path, "-o", tmp_path / "o.onnx", "-q", "--cache", blocker / "sub")
    assert result.returncode == 2 and "cannot be made" in result.stderr
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("flag", ["--report", "--plot"])
def test_report_or_plot_in_a_missing_directory_costs_nothing(tmp_path, model_path, labelled, flag):
    target = tmp_path / "nodir" / "x.out"
    started = time.perf_counter()
    run_case(
        tmp_path,
        model_path,
        "--budget",
        "1%",
        "--data",
        labelled,
        flag,
        target,
        expect=2,
        fragment="does not exist",
        extra_outputs=[target],
    )
    assert time.perf_counter() - started < 5  # refused before the search (which takes longer)


def test_report_onto_the_output_or_input_is_refused(tmp_path, model_path):
    out = tmp_path / "out.onnx"
    run_case(tmp_path, model_path, "--report", out, expect=2, fragment="the same file as -o")
    run_case(tmp_path, model_path, "--report", model_path, expect=2, fragment="overwrite the input")


def test_top1_without_labels_is_refused_before_work(tmp_path, model_path):
    unlabelled = tmp_path / "u.npz"
    np.savez(unlabelled, x=np.ones((8, 32), np.float32))
    run_case(
        tmp_path,
        model_path,
        "--budget",
        "1%",
        "--metric",
        "top1",
        "--data",
        unlabelled,
        expect=2,
        fragment="needs labels",
    )
    run_case(tmp_path, model_path, "--metric", "top1", expect=2, fragment="needs labelled --data")


def test_version():
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"tnopt {tnopt.__version__}"


def test_cache_named_after_none_is_refused():
    with pytest.raises(TnoptError, match="pass None for no cache"):
        tnopt.compress(mlp(), cache_dir=str(None))


def test_without_quiet_an_error_is_still_the_only_stderr_line(tmp_path, model_path):
    # No progress bar, no warning (e.g. "no --data given") may come before a fatal error.
    cases = [
        ["--budget", "1", "--data", tmp_path / "missing.npz"],
        ["--rank-ratio", "2"],
        ["--report", tmp_path / "nodir" / "r.json"],
    ]
    for args in cases:
        result = cli(model_path, "-o", tmp_path / "o.onnx", "--no-cache", *args)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    custom = mlp()
    custom.graph.node.append(onnx.helper.make_node("Frobnicate", ["y"], ["z"], domain="x.y", name="c"))
    custom.graph.output[0].CopyFrom(onnx.helper.make_tensor_value_info("z", 1, ["N", 10]))
    custom.opset_import.append(onnx.helper.make_opsetid("x.y", 1))
    path = save(custom, tmp_path, "custom.onnx")
    result = cli(path, "-o", tmp_path / "o.onnx", "--no-cache")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "onnxruntime cannot load the model" in result.stderr
