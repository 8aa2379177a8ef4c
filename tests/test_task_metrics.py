"""Task metrics, the per-group fidelity default, the collapse guard, plug-ins and metric sanity."""

import subprocess
import sys

import numpy as np
import pytest
from helpers import init, make_model, tensor
from onnx import helper, numpy_helper

import tnopt
from tnopt.errors import DataError, TnoptError
from tnopt.metrics import cosine
from tnopt.task_metrics import (
    CTC,
    CollapseGuard,
    Detection,
    Fidelity,
    OutputInfo,
    RunningRatio,
    Segmentation,
    ctc_greedy_decode,
    levenshtein,
    match_detections,
    nms,
    parse_groups,
    parse_spec,
)


def bound(metric, reference, names=None, labels=None):
    infos = [
        OutputInfo(n, r.shape) for n, r in zip(names or [f"out{i}" for i in range(len(reference))], reference)
    ]
    metric.bind(infos, reference, labels, None)
    return metric


# --------------------------------------------------------------------------- the two-group output
def two_group_model(seed=0):
    """y [N, 2, 32]: group 0 from a rank-4 Gemm (values ~100), group 1 from a full-rank Gemm (~1)."""
    rng = np.random.default_rng(seed)
    big = (rng.standard_normal((64, 4)) @ rng.standard_normal((4, 32)) * 6).astype(np.float32)
    small = rng.standard_normal((64, 32)).astype(np.float32) / 8
    model = make_model(
        [
            helper.make_node("Gemm", ["x", "w_big"], ["b"], name="big"),
            helper.make_node("Gemm", ["x", "w_small"], ["s"], name="small"),
            helper.make_node("Concat", ["b", "s"], ["c"], axis=1),
            helper.make_node("Reshape", ["c", "shape"], ["y"]),
        ],
        [tensor("x", ["N", 64])],
        [tensor("y", ["N", 2, 32])],
        [
            init("w_big", big),
            init("w_small", small),
            numpy_helper.from_array(np.array([-1, 2, 32], np.int64), "shape"),
        ],
    )
    data = {"x": rng.standard_normal((128, 64)).astype(np.float32)}
    return model, data


def test_whole_output_cosine_cannot_see_a_destroyed_small_group_but_fidelity_does():
    rng = np.random.default_rng(1)
    big = rng.standard_normal((200, 1, 32)) * 100
    small = rng.standard_normal((200, 1, 32))
    reference = [np.concatenate([big, small], axis=1)]
    destroyed = [np.concatenate([big, rng.standard_normal((200, 1, 32))], axis=1)]  # small group: noise
    assert cosine(reference, destroyed) >= 0.99
    metric = bound(Fidelity(), reference)
    assert metric(reference, reference) == pytest.approx(1.0)
    score = metric.score(reference, destroyed)
    assert score.value < 0.5 and score.details["worst_group"] == "out0[1]"
    assert score.details["groups"]["out0[0]"] == pytest.approx(1.0)
    guard = CollapseGuard([OutputInfo("out0", reference[0].shape)], reference, [0], {})
    reasons, _ = guard.check(reference, destroyed)
    assert reasons and "out0[1]" in reasons[0]


def test_default_budget_rejects_the_plan_that_destroys_the_small_group():
    model, data = two_group_model()
    kwargs = dict(
        budget=0.01,
        data=data,
        provider="cpu",
        cache_dir=None,
        latency_guard=False,
        correct=False,
        data_aware=False,
        methods="svd",
    )
    _, fooled = tnopt.compress(model, metric="cosine", **kwargs)
    _, report = tnopt.compress(model, **kwargs)
    assert report.budget["metric"] == "fidelity"
    decisions = {layer.name: layer.decision for layer in report.layers}
    assert decisions["small"] == "kept" and decisions["big"] == "rewritten"
    assert report.metrics["fidelity[y]"] >= 0.98
    # the old default let the destruction through, and the table now shows it
    assert {layer.name: layer.decision for layer in fooled.layers}["small"] == "rewritten"
    assert fooled.metrics["cosine"] >= 0.99 and fooled.metrics["fidelity[y]"] < 0.9


def test_metric_outputs_leave_an_output_out_and_output_spec_groups_channels():
    from tnopt.task_metrics import MetricRequest, parse_output_spec

    model, data = two_group_model()
    name, options = parse_output_spec("y:groups=0-0,1-")
    assert name == "y" and options.groups == "0-0,1-"
    assert parse_groups("0-3,4-", 10) == [(0, 4), (4, 10)]
    request = MetricRequest("fidelity", ["y"], {"y": options})
    _, report = tnopt.compress(
        model,
        budget=0.01,
        data=data,
        metric=request,
        provider="cpu",
        cache_dir=None,
        latency_guard=False,
        correct=False,
        data_aware=False,
        methods="svd",
    )
    assert report.budget["metric"] == "fidelity"
    with pytest.raises(TnoptError, match="no output 'state'"):
        tnopt.compress(
            model,
            budget=0.01,
            data=data,
            metric=MetricRequest(None, ["state"]),
            provider="cpu",
            cache_dir=None,
        )


# --------------------------------------------------------------------------- detection
def yolo(boxes_per_image, classes=3, anchors=16):
    """[N, 4+C, A] from per-image lists of (class, score, cx, cy, w, h); other anchors score 0."""
    out = np.zeros((len(boxes_per_image), 4 + classes, anchors), np.float32)
    out[:, 0:2] = 5.0
    out[:, 2:4] = 2.0
    for n, boxes in enumerate(boxes_per_image):
        for a, (c, s, cx, cy, w, h) in enumerate(boxes):
            out[n, :4, a] = (cx, cy, w, h)
            out[n, 4 + c, a] = s
    return out


def test_detection_f1_on_hand_made_boxes():
    ref = yolo([[(0, 0.9, 20, 20, 10, 10), (1, 0.8, 50, 50, 12, 12), (2, 0.7, 80, 30, 8, 8)]])
    metric = bound(Detection("detection"), [ref])
    assert metric([ref], [ref]) == 1.0
    # a miss (score under conf), a class swap (fp + fn), a box shifted off (IoU < 0.5: fp + fn)
    out = yolo([[(0, 0.1, 20, 20, 10, 10), (2, 0.8, 50, 50, 12, 12), (2, 0.7, 86, 30, 8, 8)]])
    score = metric.score([ref], [out])
    assert (score.details["tp"], score.details["fp"], score.details["fn"]) == (0, 2, 3)
    assert score.value == 0.0
    # one of three lost: F1 = 2*2 / (2*2 + 0 + 1)
    out = yolo([[(0, 0.9, 20, 20, 10, 10), (1, 0.8, 51, 50, 12, 12), (2, 0.2, 80, 30, 8, 8)]])
    assert metric([ref], [out]) == pytest.approx(4 / 5)
    # a duplicate of the first box with a lower score is suppressed by NMS: still a perfect match
    dup = yolo(
        [
            [
                (0, 0.9, 20, 20, 10, 10),
                (1, 0.8, 50, 50, 12, 12),
                (2, 0.7, 80, 30, 8, 8),
                (0, 0.6, 21, 20, 10, 10),
            ]
        ]
    )
    assert metric([ref], [dup]) == 1.0
    # ...but not across classes (per-class NMS): a same-place box of another class is a false positive
    other = yolo(
        [
            [
                (0, 0.9, 20, 20, 10, 10),
                (1, 0.8, 50, 50, 12, 12),
                (2, 0.7, 80, 30, 8, 8),
                (1, 0.6, 21, 20, 10, 10),
            ]
        ]
    )
    assert metric([ref], [other]) == pytest.approx(6 / 7)


def test_nms_and_matching_primitives():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30]], float)
    assert nms(boxes, np.array([0.5, 0.9, 0.8]), 0.5).tolist() == [1, 2]
    truth = np.array([[0, 1, 0, 0, 10, 10]], float)
    assert match_detections(truth, np.array([[0, 0.9, 0, 0, 10, 10], [0, 0.8, 0, 0, 10, 10]]), 0.5) == (
        1,
        1,
        0,
    )
    assert match_detections(truth, np.zeros((0, 6)), 0.5) == (0, 0, 1)


def test_detection_channels_last_and_pair_outputs():
    ref = yolo([[(0, 0.9, 20, 20, 10, 10), (1, 0.8, 50, 50, 12, 12)]])
    last = np.swapaxes(ref, 1, 2)
    metric = bound(Detection("detection"), [last])
    assert metric([last], [last]) == 1.0
    boxes, scores = np.ascontiguousarray(last[:, :, :4]), np.ascontiguousarray(last[:, :, 4:])
    pair = bound(Detection("detection"), [boxes, scores], ["boxes", "scores"])
    assert pair.pair == (0, 1)
    shifted = boxes.copy()
    shifted[0, 0, 0] += 8
    assert pair([boxes, scores], [shifted, scores]) == pytest.approx(2 / 4)


# --------------------------------------------------------------------------- CTC
def one_hot_steps(sequence, classes=5):
    out = np.zeros((len(sequence), classes), np.float32)
    out[np.arange(len(sequence)), sequence] = 1
    return out


def test_ctc_greedy_decode_on_known_sequences():
    probs = np.stack([one_hot_steps([0, 1, 1, 0, 1, 2, 2, 0]), one_hot_steps([3, 3, 3, 0, 0, 0, 0, 4])])
    assert ctc_greedy_decode(probs, blank=0) == [[1, 1, 2], [3, 4]]
    assert ctc_greedy_decode(probs, blank=4) == [[0, 1, 0, 1, 2, 0], [3, 0]]
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein([], [1, 2]) == 2


def test_ctc_character_accuracy_against_the_original_and_labels():
    ref = np.stack([one_hot_steps([1, 0, 2, 0, 3, 0]), one_hot_steps([4, 4, 0, 4, 0, 0])])  # "123", "44"
    out = np.stack([one_hot_steps([1, 0, 2, 0, 2, 0]), one_hot_steps([4, 4, 0, 4, 0, 0])])  # "122", "44"
    metric = bound(CTC("ctc"), [ref])
    score = metric.score([ref], [out])
    assert score.value == pytest.approx(1 - 1 / 5) and score.details["exact_match"] == 0.5
    exact = bound(parse_spec("ctc:score=exact"), [ref])
    assert exact([ref], [out]) == 0.5
    labels = np.array([[1, 2, 3], [4, 4, -1]])
    against = bound(CTC("ctc"), [ref], labels=labels)
    assert against.against_labels and against([ref], [out], labels) == pytest.approx(1 - 1 / 5)
    with pytest.raises(TnoptError, match="blank"):
        bound(parse_spec("ctc:blank=9"), [ref])


def test_segmentation_iou_of_thresholded_and_argmax_maps():
    ref = np.zeros((2, 1, 4, 4), np.float32)
    ref[:, :, :2, :2] = 0.9
    out = ref.copy()
    out[0, 0, 0, 0] = 0.1  # one of 8 foreground pixels lost
    metric = bound(Segmentation("segmentation"), [ref])
    assert metric([ref], [out]) == pytest.approx(7 / 8)
    logits = np.stack([1 - ref[:, 0], ref[:, 0]], axis=1)
    multi = bound(Segmentation("segmentation"), [logits])
    assert multi([logits], [logits]) == 1.0


def test_metrics_stream_in_batches_with_ratio_standard_error():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 300).astype(float), rng.integers(5, 10, 300).astype(float)
    whole, parts = RunningRatio(), RunningRatio()
    whole.add(x, y)
    for i in range(0, 300, 7):
        parts.add(x[i : i + 7], y[i : i + 7])
    r = x.sum() / y.sum()
    expected = np.sqrt(np.sum((x - r * y) ** 2) / (300 * 299)) / y.mean()
    assert parts.ratio == pytest.approx(r) and parts.stderr == pytest.approx(expected)
    assert whole.stderr == pytest.approx(parts.stderr)


# --------------------------------------------------------------------------- options and sanity
def test_spec_options_are_parsed_and_bad_ones_fail_in_one_line():
    metric = parse_spec("detection:iou=0.6,conf=0.3")
    assert (metric.iou, metric.conf) == (0.6, 0.3)
    with pytest.raises(TnoptError, match="unknown option"):
        parse_spec("detection:iuo=0.5")
    with pytest.raises(TnoptError, match="not a valid float"):
        parse_spec("detection:iou=high")
    with pytest.raises(TnoptError, match=r"\[0, 1\]"):
        parse_spec("detection:conf=2")


def classifier(classes=4, seed=0, bias=None):
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc")]
    bias = np.zeros(classes) if bias is None else bias
    return make_model(
        nodes,
        [tensor("x", ["N", 16])],
        [tensor("y", ["N", classes])],
        [init("w", rng.standard_normal((16, classes))), init("b", bias)],
    )


def test_metric_sanity_labels_out_of_range_and_chance_baseline_and_constant_prediction():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    common = dict(budget=0.05, provider="cpu", cache_dir=None, latency_guard=False)
    with pytest.raises(DataError, match="does not fit the 4 classes"):
        tnopt.compress(classifier(), data={"x": x, "labels": np.full(64, 7)}, **common)
    random_labels = rng.integers(0, 4, 64)
    _, report = tnopt.compress(classifier(), data={"x": x, "labels": random_labels}, **common)
    assert any("no better than guessing" in w for w in report.warnings)
    constant = classifier(bias=np.array([100.0, 0, 0, 0]))
    _, report = tnopt.compress(constant, data={"x": x}, metric="agreement", **common)
    assert any("trivially stable" in w for w in report.warnings)
    _, report = tnopt.compress(constant, data={"x": x}, **common)  # default: not the blind agreement
    assert report.budget["metric"] == "fidelity" and "one class on every" in report.budget["metric_reason"]


# --------------------------------------------------------------------------- plug-ins from the CLI
PLUGIN = """
import numpy as np

def per_sample_agreement(reference, outputs, labels):
    return (reference[0].argmax(-1) == outputs[0].argmax(-1)).astype(float)

def batch_mean(reference, outputs, labels):
    return float(np.mean(reference[0].argmax(-1) == outputs[0].argmax(-1)))

def wrong_type(reference, outputs, labels):
    return "good"

not_a_function = 3
"""


def run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "tnopt", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300
    )


@pytest.fixture
def plugin_setup(tmp_path):
    (tmp_path / "myplug.py").write_text(PLUGIN)
    model = tmp_path / "clf.onnx"
    model.write_bytes(classifier().SerializeToString())
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((64, 16)).astype(np.float32))
    return tmp_path, model


@pytest.mark.parametrize("function", ["per_sample_agreement", "batch_mean"])
def test_plugin_metric_from_the_cli_end_to_end(plugin_setup, function):
    import json

    folder, model = plugin_setup
    result = run_cli(
        model,
        "-o",
        folder / "out.onnx",
        "--budget",
        "5%",
        "--data",
        "data.npz",
        "--metric",
        f"myplug:{function}",
        "--report",
        "r.json",
        "--no-cache",
        "-q",
        cwd=folder,
    )
    assert result.returncode in (0, 3), result.stderr
    report = json.loads((folder / "r.json").read_text())
    assert report["budget"]["metric"] == f"myplug:{function}"
    assert report["budget"]["baseline_calibration"] == 1.0
    assert (folder / "out.onnx").exists()


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("nosuchmodule:fn", "cannot import 'nosuchmodule'"),
        ("myplug:missing", "has no attribute 'missing'"),
        ("myplug:not_a_function", "not a function"),
        ("myplug:wrong_type", "returned str"),
        ("bogus", "--metric 'bogus': choose from"),
    ],
)
def test_bad_plugin_is_one_line_error(plugin_setup, spec, fragment):
    folder, model = plugin_setup
    result = run_cli(
        model,
        "-o",
        folder / "out.onnx",
        "--budget",
        "5%",
        "--data",
        "data.npz",
        "--metric",
        spec,
        "--no-cache",
        "-q",
        cwd=folder,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tnopt: error:") and fragment in lines[0], result.stderr
    assert not (folder / "out.onnx").exists()


def test_python_api_takes_the_same_callable():
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((64, 16)).astype(np.float32)}
    calls = []

    def per_sample(reference, outputs, labels):
        calls.append(len(reference[0]))
        return (reference[0].argmax(-1) == outputs[0].argmax(-1)).astype(float)

    _, report = tnopt.compress(
        classifier(),
        budget=0.05,
        data=data,
        metric=per_sample,
        provider="cpu",
        cache_dir=None,
        latency_guard=False,
    )
    assert report.budget["metric"] == "per_sample" and max(calls) <= 64


def test_inspect_says_which_metric_and_suggests_detection(tmp_path):
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["y"], name="head"),
        helper.make_node("Squeeze", ["y", "axes"], ["out"]),
    ]
    model = make_model(
        nodes,
        [tensor("x", ["N", 8, 1, 64])],
        [tensor("out", ["N", 7, 64])],
        [init("w", np.ones((7, 8, 1, 1))), numpy_helper.from_array(np.array([2], np.int64), "axes")],
    )
    path = tmp_path / "det.onnx"
    path.write_bytes(model.SerializeToString())
    result = run_cli("inspect", path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "metric without --metric: fidelity" in result.stdout
    assert "--metric detection:output=out" in result.stdout


def test_fixed_ranks_flag_a_collapse_in_the_table_and_json():
    model, data = two_group_model()
    _, report = tnopt.compress(
        model,
        ranks={"small": 2},
        data=data,
        provider="cpu",
        cache_dir=None,
        correct=False,
        data_aware=False,
        methods="svd",
    )
    assert report.metrics["fidelity[y]"] < 0.5
    assert any("collapsed" in w and "y[1]" in w for w in report.warnings)
    assert "fidelity[y]" in report.summary_table()


def test_bad_output_spec_and_metric_outputs_are_one_line_errors(plugin_setup):
    folder, model = plugin_setup
    for args, fragment in (
        (["--output-spec", "y:groups=a-b"], "is not N, N-M or N-"),
        (["--output-spec", "nocolon"], "expected NAME:axis=K"),
        (["--metric-outputs", "nosuch"], "no output 'nosuch'"),
    ):
        result = run_cli(
            model,
            "-o",
            folder / "out.onnx",
            "--budget",
            "5%",
            "--data",
            "data.npz",
            *args,
            "--no-cache",
            "-q",
            cwd=folder,
        )
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], result.stderr


# --------------------------------------------------------------------------- default for recognised outputs
def scattered_yolo(images=24, classes=3, anchors=64, seed=0):
    """[N, 4+C, A]: 2 objects per image at random anchors, boxes in pixels, scores in 0..1."""
    rng = np.random.default_rng(seed)
    out = np.zeros((images, 4 + classes, anchors), np.float32)
    out[:, :4] = rng.uniform(2, 60, size=(images, 4, anchors))
    out[:, 4:] = rng.uniform(0, 0.1, size=(images, classes, anchors))
    for n in range(images):
        for a in rng.choice(anchors, 2, replace=False):
            out[n, :4, a] = (rng.uniform(10, 50), rng.uniform(10, 50), 8, 8)
            out[n, 4 + rng.integers(classes), a] = rng.uniform(0.6, 1.0)
    return out


def test_default_is_detection_for_a_yolo_output_and_fidelity_when_not_recognised():
    from tnopt.metric_choice import choose

    reference = [scattered_yolo()]
    chosen = choose(None, None, False, reference, "Concat")
    assert chosen.name == "detection" and "YOLO-style" in chosen.reason and chosen.guard is not None
    # what whole-output cosine lets through (class scores shuffled across anchors) the default rejects
    damaged = [reference[0].copy()]
    damaged[0][:, 4:] = (
        np.random.default_rng(1).permutation(damaged[0][:, 4:].transpose(2, 0, 1)).transpose(1, 2, 0)
    )
    assert cosine(reference, damaged) >= 0.99
    assert chosen(reference, damaged) < 0.5
    # scores outside 0..1 (logits), too few objects, or a second counted output: the safe fidelity default
    logits = [reference[0] * np.r_[np.ones(4), 8 * np.ones(3)][None, :, None].astype(np.float32) - 1]
    assert choose(None, None, False, logits, "Concat").name == "fidelity"
    assert choose(None, None, False, [scattered_yolo(images=4)], "Concat").name == "fidelity"
    state = np.zeros((24, 5), np.float32)
    assert choose(None, None, False, reference + [state], "Concat").name == "fidelity"


def softmax_steps(samples=16, steps=12, classes=6, blank=5, seed=0, blank_share=0.7):
    rng = np.random.default_rng(seed)
    other = rng.integers(0, classes, (samples, steps))
    best = np.where(rng.random((samples, steps)) < blank_share, blank, other)
    logits = rng.normal(0, 0.3, (samples, steps, classes))
    logits[np.arange(samples)[:, None], np.arange(steps)[None, :], best] += 4
    probs = np.exp(logits)
    return (probs / probs.sum(axis=-1, keepdims=True)).astype(np.float32)


def test_default_is_ctc_with_the_dominant_class_as_blank_and_per_class_groups_otherwise():
    from tnopt.metric_choice import choose

    reference = [softmax_steps(blank=5)]
    chosen = choose(None, None, False, reference, "Softmax")
    assert chosen.name == "ctc" and chosen.blank == 5
    # no dominant class: not CTC-shaped; fidelity's channels are the softmax's classes, not time steps
    flat = [softmax_steps(blank=5, blank_share=0.0)]
    chosen = choose(None, None, False, flat, "Softmax")
    assert chosen.name == "fidelity"
    assert chosen.layout.axes == {0: 2} and len(chosen.layout.groups) == 6
    # a class the data never shows is floored at a probability spread of 0.01: its round-off is no collapse
    rare = flat[0].copy()
    rare[..., 0] = 1e-6
    rare /= rare.sum(axis=-1, keepdims=True)
    noisy = rare.copy()
    noisy[..., 0] += 1e-3
    guard = CollapseGuard([OutputInfo("p", rare.shape, "Softmax")], [rare], [0], {})
    assert guard.layout.groups[0].spread == pytest.approx(0.01)
    assert guard.check([rare], [noisy])[0] == []
    # a class that is read, then destroyed, is one
    destroyed = rare.copy()
    destroyed[..., 3] = destroyed[..., 3].mean()
    assert any("p[3]" in reason for reason in guard.check([rare], [destroyed])[0])
    # Held-out samples that use the class the calibration data never showed: an error small beside
    # what the class varies by there is no collapse (it was one against the calibration floor) ...
    used = flat[0].copy()
    used[..., 0] = np.linspace(0.0, 0.3, used[..., 0].size).reshape(used[..., 0].shape)
    used /= used.sum(axis=-1, keepdims=True)
    slightly = used.copy()
    slightly[..., 0] += 0.01 * np.where(np.arange(used[..., 0].size).reshape(used[..., 0].shape) % 2, 1, -1)
    assert 1 - np.mean((used[..., 0] - slightly[..., 0]) ** 2) / 0.01**2 < 0.5  # against the floor
    assert guard.check([used], [slightly])[0] == []
    # ... but the class destroyed there still is.
    flattened = used.copy()
    flattened[..., 0] = used[..., 0].mean()
    assert any("p[0]" in reason for reason in guard.check([used], [flattened])[0])


def test_default_for_a_sigmoid_probability_map_is_the_worst_iou_over_thresholds():
    from tnopt.metric_choice import choose

    rng = np.random.default_rng(0)
    maps = np.zeros((8, 1, 16, 16), np.float32)
    maps[:, :, 4:10, 3:12] = 0.75  # a region the original calls text at 0.3, 0.5 and 0.7
    maps[:, :, 12:14, 2:6] = 0.95
    maps += rng.uniform(0, 0.05, maps.shape).astype(np.float32)
    chosen = choose(None, None, False, [maps], "Sigmoid")
    assert chosen.name == "segmentation" and "0.3, 0.5, 0.7" in chosen.reason
    # pushed from 0.75 to 0.65: identical at 0.3 and 0.5, gone at 0.7; the default charges the worst
    faded = maps.copy()
    faded[:, :, 4:10, 3:12] -= 0.1
    score = chosen.score([maps], [faded])
    assert score.details["iou_at"]["0.5"] == pytest.approx(1.0) and score.details["worst"] == 0.7
    assert score.value < 0.5
    # not written by a Sigmoid (a regression map), or empty at 0.5: the fidelity default
    assert choose(None, None, False, [maps], "Conv").name == "fidelity"
    assert choose(None, None, False, [maps * 0.4], "Sigmoid").name == "fidelity"


def test_group_errors_are_the_same_a_chunk_of_samples_at_a_time(monkeypatch):
    from tnopt.task_metrics import fidelity

    rng = np.random.default_rng(0)
    reference = [rng.random((37, 5, 9)).astype(np.float32), rng.standard_normal((37, 3)).astype(np.float32)]
    outputs = [r + np.float32(0.05) * rng.standard_normal(r.shape).astype(np.float32) for r in reference]
    guard = CollapseGuard(
        [OutputInfo("a", reference[0].shape), OutputInfo("b", reference[1].shape)], reference, [0, 1], {}
    )
    whole = guard.layout.squared_errors(reference, outputs)
    monkeypatch.setattr(fidelity, "ERROR_CHUNK", 4)
    chunked = guard.layout.squared_errors(reference, outputs)
    assert whole.shape == chunked.shape == (37, len(guard.layout.groups))
    np.testing.assert_allclose(chunked, whole, rtol=1e-12, atol=0)
