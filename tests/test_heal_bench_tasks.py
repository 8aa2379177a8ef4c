"""bench/heal_tasks.py: whole-graph FLOPs at per-sample shapes (attention products included), the
per-sentence shapes of a token batch, and seeded photo crops for splits by photo."""

import sys

import numpy as np
import onnx
import pytest
from conftest import MODELS
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(MODELS.parent / "bench"))
import heal_tasks  # noqa: E402

from tnopt.pipeline import summarize  # noqa: E402


def _attention_like() -> onnx.ModelProto:
    """x [1, s, 4] · W (4x4) = q; q · qᵀ = scores [1, s, s] (an activation-by-activation MatMul)."""
    w = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["q"], name="proj"),
        helper.make_node("Transpose", ["q"], ["qt"], perm=[0, 2, 1], name="t"),
        helper.make_node("MatMul", ["q", "qt"], ["scores"], name="attn"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, None)],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_graph_flops_counts_weight_and_activation_matmuls_at_the_given_shape():
    model = _attention_like()
    # 2·s·4·4 for the projection + 2·s·s·4 for the scores
    assert heal_tasks.graph_flops(model, {"x": [1, 3, 4]}) == 2 * 3 * 16 + 2 * 9 * 4
    assert heal_tasks.graph_flops(model, {"x": [1, 8, 4]}) == 2 * 8 * 16 + 2 * 64 * 4
    samples = [({"x": [1, 3, 4]}, 3), ({"x": [1, 8, 4]}, 1)]
    assert heal_tasks.mean_flops(model, samples) == pytest.approx((3 * 168 + 768) / 4)


def test_graph_flops_equals_the_reports_count_on_a_conv_net():
    model = onnx.load(str(MODELS / "resnet.onnx"))
    assert heal_tasks.graph_flops(model, {"input": [1, 1, 28, 28]}) == summarize(model).flops


def test_per_sample_shapes_take_each_sentence_at_its_unpadded_length():
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int64)
    data = {"input_ids": np.ones_like(mask), "attention_mask": mask}
    shapes = heal_tasks.per_sample_shapes(data)
    assert shapes == [
        ({"input_ids": [1, 3], "attention_mask": [1, 3]}, 2),
        ({"input_ids": [1, 5], "attention_mask": [1, 5]}, 1),
    ]
    images = {"input": np.zeros((7, 3, 32, 32), np.float32)}
    assert heal_tasks.per_sample_shapes(images) == [({"input": [1, 3, 32, 32]}, 1)]


def test_photo_crops_are_seeded_and_split_by_photo():
    pytest.importorskip("skimage", reason="pip install -e '.[bench]' installs scikit-image")
    sys.path.insert(0, str(MODELS))
    import efficientnet

    assert not set(heal_tasks.CALIB_PHOTOS) & set(heal_tasks.EVAL_PHOTOS)
    a = efficientnet.photo_crops(["coffee", "moon"], 4, seed=3)
    b = efficientnet.photo_crops(["coffee", "moon"], 4, seed=3)
    c = efficientnet.photo_crops(["coffee", "moon"], 4, seed=4)
    assert a.shape == (4, 3, 224, 224) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # moon is grey: its crops (rows 1 and 3) have three equal channels, coffee's do not
    assert np.array_equal(a[1, 0], a[1, 2]) and not np.array_equal(a[0, 0], a[0, 2])
