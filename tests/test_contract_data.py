"""Data files: what no model can use is refused in one line (exit 2) before any weight is read."""

import zipfile

import numpy as np
import pytest
from contract import mlp, run_case
from helpers import cli

import tnopt
from tnopt.errors import DataError


def good_x(n=16):
    return np.random.default_rng(2).standard_normal((n, 32)).astype(np.float32)


def npz(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _with(value, at=(0, 0)):
    x = good_x()
    x[at] = value
    return x


@pytest.mark.parametrize(
    "arrays, fragment",
    [
        ({"x": _with(np.nan)}, "holds 1 NaN/Inf value (first in sample 0)"),
        ({"x": _with(np.inf, (5, 3))}, "(first in sample 5)"),
        ({"x": _with(-np.inf)}, "NaN/Inf"),
        ({"x": np.zeros((0, 32), np.float32)}, "has 0 samples"),
        ({"x": good_x(), "t": np.array(2.0, np.float32)}, "'t' is a single value (0-d)"),
        ({"x": np.array([["a"] * 32] * 4)}, "has dtype <U1"),
        ({"x": good_x(), "labels": np.array(["cat"] * 16)}, "'labels' has dtype <U3"),
        ({"x": good_x(), "labels": np.array(3)}, "'labels' is a single value"),
        ({"x": good_x(), "labels": np.full(16, np.nan)}, "'labels' holds 16 NaN/Inf values"),
        ({"x": good_x(), "labels": np.zeros(5, np.int64)}, "'labels' has 5 entries"),
        ({"labels": np.zeros(16, np.int64)}, "holds only 'labels'"),
        ({"wrong": good_x(), "other": good_x()}, "no array for model input"),
        ({"x": good_x()[:, :7]}, "the model expects"),
    ],
)
def test_unusable_data_is_one_line(tmp_path, model_path, arrays, fragment):
    data = npz(tmp_path, **arrays)
    run_case(tmp_path, model_path, "--rank-ratio", "0.5", "--data", data, expect=2, fragment=fragment)


def test_zip_without_npy_members_and_other_files(tmp_path, model_path):
    archive = tmp_path / "z.npz"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("readme.txt", "hello")
    run_case(tmp_path, model_path, "--data", archive, expect=2, fragment="'readme.txt' is not a .npy array")
    empty = tmp_path / "e.npz"
    zipfile.ZipFile(empty, "w").close()
    run_case(tmp_path, model_path, "--data", empty, expect=2, fragment="holds no arrays")
    text = tmp_path / "t.npz"
    text.write_text("x,y\n1,2\n")
    run_case(tmp_path, model_path, "--data", text, expect=2, fragment="not a .npz archive")
    run_case(tmp_path, model_path, "--data", tmp_path, expect=2, fragment="is a directory")
    run_case(tmp_path, model_path, "--data", tmp_path / "missing.npz", expect=2, fragment="no such data file")


def test_eval_data_needs_data(tmp_path, model_path):
    data = npz(tmp_path, x=good_x())
    run_case(tmp_path, model_path, "--eval-data", data, expect=2, fragment="--eval-data needs --data")


def test_bad_eval_data_is_caught_before_work(tmp_path, model_path):
    data = npz(tmp_path, x=good_x())
    bad = npz(tmp_path, "bad.npz", x=_with(np.nan))
    run_case(tmp_path, model_path, "--data", data, "--eval-data", bad, expect=2, fragment="bad.npz")


def test_api_data_dicts_are_checked_too():
    with pytest.raises(DataError, match="NaN/Inf"):
        tnopt.compress(mlp(), data={"x": _with(np.nan)})
    with pytest.raises(DataError, match="0 samples"):
        tnopt.compress(mlp(), data={"x": np.zeros((0, 32), np.float32)})
    with pytest.raises(DataError, match="must be a .npz path or a dict"):
        tnopt.compress(mlp(), data=[1, 2, 3])


def test_good_data_compresses(tmp_path, model_path):
    data = npz(tmp_path, x=good_x(64))
    run_case(tmp_path, model_path, "--rank-ratio", "0.25", "--data", data, expect=0)


def test_compare_without_data_says_it_used_random_inputs(tmp_path, model_path):
    result = cli("compare", model_path, model_path)
    assert result.returncode == 0
    assert "seeded random inputs" in result.stderr
    bad = npz(tmp_path, x=_with(np.nan))
    result = cli("compare", model_path, model_path, "--data", bad)
    assert result.returncode == 2 and "NaN/Inf" in result.stderr
