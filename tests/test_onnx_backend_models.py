"""The single-op models shipped in the onnx wheel (pytorch-converted): each is rewritten at full
rank and still matches its shipped reference output; only the depthwise ones are refused (with
that reason). None crashes.

They are opset 6, below tnopt's minimum (11): tnopt refuses the originals with a one-line reason,
and the test runs the machinery on their opset-11 conversions (onnx.version_converter)."""

import glob
import os

import onnx
import pytest
from helpers import relative_difference, run
from onnx import numpy_helper, version_converter

import tnopt
from tnopt.errors import TnoptError, UnsupportedModelError

ROOT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "pytorch-converted")
CASES = sorted(
    os.path.basename(p)
    for p in glob.glob(os.path.join(ROOT, "test_Conv*")) + glob.glob(os.path.join(ROOT, "test_Linear*"))
)


def load_case(name):
    folder = os.path.join(ROOT, name)
    model = onnx.load(os.path.join(folder, "model.onnx"))
    data = os.path.join(folder, "test_data_set_0")
    inputs = [numpy_helper.to_array(onnx.load_tensor(p)) for p in sorted(glob.glob(f"{data}/input_*.pb"))]
    outputs = [numpy_helper.to_array(onnx.load_tensor(p)) for p in sorted(glob.glob(f"{data}/output_*.pb"))]
    return model, inputs, outputs


def test_cases_cover_the_families():
    assert len(CASES) >= 25
    for family in (
        "Conv1d",
        "Conv2d_groups",
        "Conv2d_depthwise",
        "Conv2d_dilated",
        "Conv3d",
        "ConvTranspose2d",
        "Linear",
    ):
        assert any(family in case for case in CASES), family


def test_original_opset6_model_is_refused_with_a_reason():
    model, _, _ = load_case("test_Conv2d")
    with pytest.raises(UnsupportedModelError, match="opset 6 is below the supported minimum 11"):
        tnopt.compress(model, provider="cpu")


# Depthwise convs have nothing to factorize across channels; every other case must be rewritten.
REFUSED = {name: "depthwise Conv" for name in CASES if "depthwise" in name}


@pytest.mark.parametrize("name", CASES)
def test_full_rank_rewrite_matches_shipped_output_or_gives_the_expected_reason(name):
    model, inputs, outputs = load_case(name)
    converted = version_converter.convert_version(model, 11)
    converted.ir_version = model.ir_version if model.ir_version >= 6 else 6  # opset 11 needs IR ≥ 6
    feed = {converted.graph.input[0].name: inputs[0]}
    if name in REFUSED:
        with pytest.raises(TnoptError, match=REFUSED[name]) as refused:
            tnopt.compress(converted, rank_ratio=1.0, allow_growth=True, data=feed, provider="cpu")
        assert len(str(refused.value).splitlines()) == 1
        return
    compressed, report = tnopt.compress(
        converted, rank_ratio=1.0, allow_growth=True, data=feed, provider="cpu"
    )
    assert len(report.rewritten) == len(report.layers) == 1, [entry.reason for entry in report.layers]
    got = run(compressed, feed)[0]
    assert relative_difference(outputs[0], got) < 1e-4, name


def test_how_many_cases_are_rewritten():
    assert len(CASES) - len(REFUSED) >= 25 and len(REFUSED) == 4
