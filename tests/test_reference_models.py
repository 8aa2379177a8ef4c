"""The committed reference models: structure as documented, and full rank reproduces them."""

import numpy as np
import onnx
import pytest
from conftest import MODELS, REFERENCE_MODELS
from helpers import op_count, relative_difference, run

import tnopt
from tnopt.analyze import analyze

EXPECTED_LAYERS = {  # (Conv, Gemm) per model, as described in models/README.md
    "fc2": (0, 2),
    "lenet5": (2, 3),
    "cnn4": (4, 1),
    "vgg": (6, 3),
    "resnet": (15, 1),
}


@pytest.fixture(scope="module")
def calib():
    with np.load(MODELS / "calib.npz") as archive:
        return {"input": archive["input"][:64], "labels": archive["labels"][:64]}


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_structure(name):
    model = onnx.load(str(MODELS / f"{name}.onnx"))
    conv, gemm = EXPECTED_LAYERS[name]
    assert (op_count(model, "Conv"), op_count(model, "Gemm")) == (conv, gemm)
    assert op_count(model, "BatchNormalization") == 0
    assert model.ir_version <= 10
    layers = analyze(model)
    assert len(layers) == conv + gemm and all(layer.candidate for layer in layers)


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_full_rank_reproduces_outputs(name, calib):
    path = MODELS / f"{name}.onnx"
    compressed, report = tnopt.compress(
        str(path), rank_ratio=1.0, data=calib, provider="cpu", allow_growth=True
    )
    assert len(report.rewritten) == sum(EXPECTED_LAYERS[name])
    original = onnx.load(str(path))
    assert compressed.ir_version == original.ir_version
    assert [(o.domain, o.version) for o in compressed.opset_import] == [
        (o.domain, o.version) for o in original.opset_import
    ]
    (expected,) = run(original, {"input": calib["input"]})
    (got,) = run(compressed, {"input": calib["input"]})
    assert relative_difference(expected, got) < 1e-4
    assert report.metrics["agreement"] == 1.0
