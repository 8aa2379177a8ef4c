"""Graph shapes real exporters write that broke tnopt (found by bench/graph_shapes.py): each is
rewritten correctly or listed with its reason."""

import json

import numpy as np
import onnx
from contract import decisions, run_case, save, single
from helpers import init, relative_difference, run, tensor
from onnx import TensorProto, helper, numpy_helper

from tnopt.analyze import analyze
from tnopt.layer_rows import batch_first, input_rows


def _weight(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) / np.sqrt(shape[0])


def rewrite(tmp_path, model, rank_ratio="1", **calib) -> tuple[onnx.ModelProto, dict[str, dict]]:
    """`tnopt MODEL --rank-ratio R` held to the contract (exit 0) — at full rank with
    --allow-growth, so that every rewrite must reproduce the original —, with `calib` saved as
    calib.npz and passed as --data when given: the written model and the report's decisions."""
    args = ["--rank-ratio", rank_ratio] + (["--allow-growth"] if rank_ratio == "1" else [])
    if calib:
        np.savez(tmp_path / "calib.npz", **calib)
        args += ["--data", tmp_path / "calib.npz"]
    report = tmp_path / "r.json"
    run_case(tmp_path, save(model, tmp_path), *args, "--report", report, expect=0)
    return onnx.load(str(tmp_path / "out.onnx")), decisions(report)


def test_gemm_trans_a_with_calibration_data_is_exact_at_full_rank(tmp_path):
    # A is (K, N): its batch sits on axis 1, and captures arrive with it moved to axis 0. The input
    # moments were taken over the wrong axis (exit 4: a 64x64 moment for a 24-row weight).
    model = single(
        helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc", transA=1, alpha=0.5, beta=2.0),
        [tensor("x", [24, "N"])],
        [tensor("y", ["N", 16])],
        [init("w", _weight(24, 16)), init("c", np.linspace(-1, 1, 16).reshape(1, 16))],
    )
    x = np.random.default_rng(1).standard_normal((24, 64)).astype(np.float32)
    out, layers = rewrite(tmp_path, model, x=x)
    assert layers["fc"]["decision"] == "rewritten"
    assert relative_difference(run(model, {"x": x})[0], run(out, {"x": x})[0]) < 1e-4


def test_trans_a_rows_read_moved_and_unmoved_captures():
    model = single(
        helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transA=1),
        [tensor("x", [8, "N"])],
        [tensor("y", ["N", 5])],
        [init("w", _weight(8, 5))],
    )
    layer = analyze(model)[0]
    moved = np.arange(6 * 8, dtype=np.float32).reshape(6, 8)  # the runtime moved N to axis 0
    assert np.array_equal(input_rows(layer, moved), moved) and batch_first(layer, moved, 6)
    fixed = single(
        helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transA=1),
        [tensor("x", [8, 6])],
        [tensor("y", [6, 5])],
        [init("w", _weight(8, 5))],
    )
    as_held = moved.T.copy()  # a fixed-shape A comes as the model holds it, (K, M)
    assert np.array_equal(input_rows(analyze(fixed)[0], as_held), moved)


def test_a_dequantized_weight_behind_a_transpose_is_listed_and_a_qdq_activation_is_not():
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wt"], name="dq_w"),
        helper.make_node("Transpose", ["wt"], ["w"], name="tr", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w"], ["h"], name="qmm"),
        helper.make_node("QuantizeLinear", ["h", "s", "z"], ["hq"], name="q_h"),
        helper.make_node("DequantizeLinear", ["hq", "s", "z"], ["hd"], name="dq_h"),
        helper.make_node("Transpose", ["hd"], ["ht"], name="tr_h", perm=[1, 0]),
        helper.make_node("MatMul", ["h", "ht"], ["y"], name="activations"),
    ]
    model = single(
        nodes,
        [tensor("x", ["N", 16])],
        [tensor("y", ["N", "N"])],
        [
            numpy_helper.from_array(rng.integers(-100, 100, (12, 16)).astype(np.int8), "wq"),
            init("s", np.array(0.01)),
            numpy_helper.from_array(np.array(0, np.int8), "z"),
        ],
    )
    layers = {layer.name: layer for layer in analyze(model)}
    assert set(layers) == {"qmm"}
    assert "dequantized at run time (DequantizeLinear)" in layers["qmm"].skip_reason


def test_graph_outputs_keep_their_declared_dims(tmp_path):
    # Shape inference fills in dims an exporter left unknown; the written model declared them
    # concrete (['N', 8, 6, 6] for [?, ?, ?, ?]) — the interface changed.
    model = single(
        [
            helper.make_node("Conv", ["x", "w"], ["h"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["h"], ["y"], name="relu"),
        ],
        [tensor("x", ["N", 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)],
        [init("w", _weight(8, 8, 3, 3))],
    )
    out, layers = rewrite(tmp_path, model, "0.5")
    assert layers["conv"]["decision"] == "rewritten"
    dims = out.graph.output[0].type.tensor_type.shape.dim
    assert len(dims) == 4 and all(not d.dim_param and not d.HasField("dim_value") for d in dims)


def test_kept_nodes_keep_their_doc_strings_and_metadata_inside_bodies_too(tmp_path):
    # graphsurgeon dropped every node's doc_string and metadata_props (torch's dynamo exporter writes
    # module paths there), in Loop bodies too.
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="go_on"),
            helper.make_node("Neg", ["v_in"], ["v_out"], name="negate", doc_string="inside the body"),
        ],
        "body",
        [tensor("i", [], TensorProto.INT64), tensor("cond_in", [], TensorProto.BOOL), tensor("v_in", 2)],
        [tensor("cond_out", [], TensorProto.BOOL), tensor("v_out", 2)],
    )
    relu = helper.make_node("Relu", ["h"], ["r"], name="relu", doc_string="kept as it is")
    entry = relu.metadata_props.add()
    entry.key, entry.value = "namespace", "block0: torch.nn.ReLU"
    model = single(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            relu,
            helper.make_node("Loop", ["trips", "", "r"], ["y"], name="loop", body=body),
        ],
        [tensor("x", ["N", 32])],
        [tensor("y", ["N", 32])],
        [init("w", _weight(32, 32)), numpy_helper.from_array(np.array(2, np.int64), "trips")],
    )
    written, layers = rewrite(tmp_path, model, "0.25")
    assert layers["mm"]["decision"] == "rewritten"
    out = {node.name: node for node in written.graph.node}
    assert out["relu"].doc_string == "kept as it is"
    assert [(p.key, p.value) for p in out["relu"].metadata_props] == [("namespace", "block0: torch.nn.ReLU")]
    negate = next(n for n in out["loop"].attribute[0].g.node if n.op_type == "Neg")
    assert negate.doc_string == "inside the body"


def test_graph_metadata_and_input_output_doc_strings_and_metadata_are_kept(tmp_path):
    model = single(
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        [tensor("x", ["N", 32])],
        [tensor("y", ["N", 32])],
        [init("w", _weight(32, 32))],
    )
    model.ir_version = 10
    model.graph.input[0].doc_string, model.graph.output[0].doc_string = "features", "embedding"
    entry = model.graph.metadata_props.add()
    entry.key, entry.value = "source", "tf2onnx"
    entry = model.graph.input[0].metadata_props.add()  # torch's dynamo exporter writes these
    entry.key, entry.value = "pkg.torch.export.graph_signature.InputSpec.kind", "USER_INPUT"
    out, layers = rewrite(tmp_path, model, "0.25")
    assert layers["mm"]["decision"] == "rewritten"
    assert [(p.key, p.value) for p in out.graph.metadata_props] == [("source", "tf2onnx")]
    assert (out.graph.input[0].doc_string, out.graph.output[0].doc_string) == ("features", "embedding")
    kind = [(p.key, p.value) for p in out.graph.input[0].metadata_props]
    assert kind == [("pkg.torch.export.graph_signature.InputSpec.kind", "USER_INPUT")]


def _zipmap_model():
    seq_map = helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))
    )
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w"], ["logits"], name="fc"),
            helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=1),
            helper.make_node(
                "ZipMap", ["probs"], ["probabilities"], domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2]
            ),
        ],
        "skl",
        [tensor("x", ["N", 16])],
        [helper.make_value_info("probabilities", seq_map)],
        [init("w", _weight(16, 3))],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.ml", 1)], ir_version=8
    )


def test_a_sequence_of_maps_output_is_refused_in_one_line(tmp_path):
    # skl2onnx's classifiers end in ZipMap: a sequence of maps that no comparison could read (exit 4
    # from the reference tap, or an unloadable rewrite whose export lost the output's type).
    model = _zipmap_model()
    run_case(
        tmp_path,
        save(model, tmp_path),
        "--rank-ratio",
        "0.5",
        expect=2,
        fragment="graph output 'probabilities' is a sequence (e.g. scikit-learn's ZipMap), not a tensor",
    )


def test_fixed_batch_4_model_under_a_budget(tmp_path):
    # The latency guard captured each layer's input from one sample, which a [4, 24] input refuses:
    # exit 2 "onnxruntime failed to run the model" on a model that runs fine.
    rng = np.random.default_rng(3)
    model = single(
        [
            helper.make_node("Gemm", ["x", "w1", "c1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            # C (4, 12): the batch is fixed for good (a dynamic-batch copy cannot broadcast it).
            helper.make_node("Gemm", ["r", "w2", "c2"], ["y"], name="fc2"),
        ],
        [tensor("x", [4, 24])],
        [tensor("y", [4, 12])],
        [
            init("w1", _weight(24, 32)),
            init("c1", np.zeros(32)),
            init("w2", _weight(32, 12)),
            init("c2", rng.standard_normal((4, 12))),
        ],
    )
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((32, 24)).astype(np.float32))
    report = tmp_path / "r.json"
    run_case(
        tmp_path,
        save(model, tmp_path),
        "--budget",
        "1%",
        "--data",
        tmp_path / "calib.npz",
        "--report",
        report,
        expect=0,
    )
    assert set(decisions(report)) == {"fc1", "fc2"}


def test_batch_1_export_that_squeezes_the_batch_away(tmp_path):
    # x [1, 32] → Squeeze → (32,) @ W: run one sample at a time, the MatMul's input has no batch
    # axis, and trimming each run's value to "its one sample" kept x[0][:1] — exit 4 on a 1x1 moment.
    model = single(
        [
            helper.make_node("Squeeze", ["x", "axis0"], ["v"], name="squeeze"),
            helper.make_node("MatMul", ["v", "w"], ["h"], name="mm"),
            helper.make_node("Unsqueeze", ["h", "axis0"], ["y"], name="unsqueeze"),
        ],
        [tensor("x", [1, 32])],
        [tensor("y", [1, 24])],
        [init("w", _weight(32, 24)), numpy_helper.from_array(np.array([0], np.int64), "axis0")],
    )
    x = np.random.default_rng(4).standard_normal((16, 32)).astype(np.float32)
    out, layers = rewrite(tmp_path, model, x=x)
    assert layers["mm"]["decision"] == "rewritten"
    for sample in x[:3]:
        feed = {"x": sample[None]}
        assert relative_difference(run(model, feed)[0], run(out, feed)[0]) < 1e-4


def test_a_single_vector_input_without_a_batch_axis_is_refused_in_one_line(tmp_path):
    # x [32] @ W: its one axis was read as the batch, so calibration subsets of it were fed to a
    # 32-row weight (exit 4 under --budget).
    model = single(
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        [tensor("x", [32])],
        [tensor("y", [24])],
        [init("w", _weight(32, 24))],
    )
    np.savez(tmp_path / "calib.npz", x=np.ones(32, np.float32))
    run_case(
        tmp_path,
        save(model, tmp_path),
        "--budget",
        "1%",
        "--data",
        tmp_path / "calib.npz",
        expect=2,
        fragment="input 'x' [32] is a single vector with no batch axis",
    )


def test_an_unused_overridable_input_stays_in_the_interface(tmp_path):
    # An initializer listed as a graph input (a default the caller may override) that no node reads:
    # graphsurgeon's cleanup dropped it, and a caller feeding it was refused by the written model.
    model = single(
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        [tensor("x", ["N", 32]), tensor("temperature", [])],
        [tensor("y", ["N", 32])],
        [init("w", _weight(32, 32)), init("temperature", np.array(1.0))],
    )
    out, layers = rewrite(tmp_path, model, "0.25")
    assert layers["mm"]["decision"] == "rewritten"
    assert [i.name for i in out.graph.input] == ["x", "temperature"]
    x = np.ones((2, 32), np.float32)
    run(out, {"x": x, "temperature": np.array(2.0, np.float32)})


def _low_rank(k, n, rank, seed=0):
    g = np.random.default_rng(seed)
    return (g.standard_normal((k, rank)) @ g.standard_normal((rank, n)) / np.sqrt(k * rank)).astype(
        np.float32
    )


def test_gemm_with_a_full_c_is_not_refitted_into_a_double_bias(tmp_path):
    # C (4, 12) is no per-channel bias: the refit had no intercept, fitted B to a target holding
    # C, and the rewritten Gemm added C again — a planted rank-3 weight at rank 6 read 25% off.
    rng = np.random.default_rng(5)
    model = single(
        helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc", alpha=2.0),
        [tensor("x", [4, 20])],
        [tensor("y", [4, 12])],
        [init("w", _low_rank(20, 12, 3)), init("c", rng.standard_normal((4, 12)))],
    )
    x = rng.standard_normal((64, 20)).astype(np.float32)
    out, layers = rewrite(tmp_path, model, "0.5", x=x)
    assert layers["fc"]["decision"] == "rewritten"
    assert relative_difference(run(model, {"x": x[:4]})[0], run(out, {"x": x[:4]})[0]) < 1e-4


def test_a_bias_fed_at_run_time_stays_an_input_of_the_rewritten_conv(tmp_path):
    # The refit's intercept replaced the Conv's bias input b with a constant: the written model
    # ignored b (59% off once the caller fed another b).
    rng = np.random.default_rng(6)
    model = single(
        helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1]),
        [tensor("x", ["N", 8, 6, 6]), tensor("b", [16])],
        [tensor("y", ["N", 16, 6, 6])],
        [init("w", _low_rank(16, 8 * 9, 3).reshape(16, 8, 3, 3))],
    )
    calib = {"x": rng.standard_normal((64, 8, 6, 6)).astype(np.float32), "b": np.zeros(16, np.float32)}
    out, layers = rewrite(tmp_path, model, **calib)
    assert layers["conv"]["decision"] == "rewritten"
    feed = {"x": calib["x"][:4], "b": np.linspace(-1, 1, 16).astype(np.float32)}
    assert relative_difference(run(model, feed)[0], run(out, feed)[0]) < 1e-3


def test_layers_inside_if_and_scan_bodies_are_listed_with_a_reason(tmp_path):
    then_graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w_then"], ["t"], name="then_mm")],
        "then",
        [],
        [tensor("t", ["N", 32])],
        [init("w_then", _weight(32, 32, seed=1))],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e"], name="else_neg")], "else", [], [tensor("e", ["N", 32])]
    )
    model = single(
        [
            helper.make_node(
                "If", ["flag"], ["b"], name="choose", then_branch=then_graph, else_branch=else_graph
            ),
            helper.make_node("MatMul", ["b", "w"], ["y"], name="mm"),
        ],
        [tensor("x", ["N", 32])],
        [tensor("y", ["N", 32])],
        [init("w", _weight(32, 32)), numpy_helper.from_array(np.array(True), "flag")],
    )
    _, layers = rewrite(tmp_path, model, "0.25")
    assert layers["mm"]["decision"] == "rewritten"
    body = layers["choose/then_branch/then_mm"]
    assert body["decision"] == "skipped" and "inside the If node 'choose' (then_branch)" in body["reason"]


def test_inspect_json_stays_json_on_a_sequence_of_maps_output(tmp_path):
    # graphsurgeon printed "[W] Could not convert: UNDEFINED ..." to stdout ahead of the JSON.
    import subprocess
    import sys

    path = save(_zipmap_model(), tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "tnopt", "inspect", str(path), "--json"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert [layer["name"] for layer in json.loads(result.stdout)] == ["fc"]


def test_outer_constants_read_in_a_body_stay_outside_it(tmp_path):
    # graphsurgeon copied every outer-scope constant a body reads into the body: `w_shared` was stored
    # twice, and the body's copy of the overridable default `scale` shadowed what the caller fed.
    then_graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w_shared"], ["p"], name="then_mm"),
            helper.make_node("Mul", ["p", "scale"], ["t"], name="then_scale"),
        ],
        "then",
        [],
        [tensor("t", ["N", 32])],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e"], name="else_neg")], "else", [], [tensor("e", ["N", 32])]
    )
    model = single(
        [
            helper.make_node("MatMul", ["x", "w_shared"], ["a"], name="top_mm"),
            helper.make_node(
                "If", ["flag"], ["b"], name="choose", then_branch=then_graph, else_branch=else_graph
            ),
            helper.make_node("Add", ["a", "b"], ["s"], name="add"),
            helper.make_node("MatMul", ["s", "w"], ["y"], name="mm"),
        ],
        [tensor("x", ["N", 32]), tensor("scale", [])],
        [tensor("y", ["N", 32])],
        [
            init("w_shared", _weight(32, 32, seed=2)),
            init("w", _weight(32, 32)),
            init("scale", np.array(1.0)),
            numpy_helper.from_array(np.array(True), "flag"),
        ],
    )
    out, layers = rewrite(tmp_path, model)
    assert layers["mm"]["decision"] == "rewritten"
    choose = next(n for n in out.graph.node if n.op_type == "If")
    assert [t.name for a in choose.attribute for t in a.g.initializer] == []
    assert [t.name for t in out.graph.initializer].count("w_shared") == 1
    feed = {"x": np.ones((2, 32), np.float32), "scale": np.array(3.0, np.float32)}
    assert relative_difference(run(model, feed)[0], run(out, feed)[0]) < 1e-4


def _heal_case(tmp_path, model, x):
    np.savez(tmp_path / "calib.npz", x=x)
    report = tmp_path / "r.json"
    run_case(
        tmp_path,
        save(model, tmp_path),
        "--rank-ratio",
        "0.5",
        "--data",
        tmp_path / "calib.npz",
        "--heal",
        "5",
        "--report",
        report,
        expect=0,
    )
    return json.loads(report.read_text())


def test_healing_a_gemm_with_trans_a(tmp_path):
    # The whole-graph path fed [K, N]'s samples on axis 0, and block training fed the sample-major
    # capture to a forward that transposes A again: exit 4 either way.
    model = single(
        helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transA=1),
        [tensor("x", [24, "N"])],
        [tensor("y", ["N", 16])],
        [init("w", _weight(24, 16))],
    )
    x = np.random.default_rng(7).standard_normal((24, 64)).astype(np.float32)
    report = _heal_case(tmp_path, model, x)
    healed = report["heal"]["plans"][0]["heal"]
    assert healed["path"] == "block" and "batch on axis 1" in healed["reason"] and healed["steps"] == 5


def test_healing_a_batch_1_export_that_squeezes(tmp_path):
    model = single(
        [
            helper.make_node("Squeeze", ["x", "axis0"], ["v"], name="squeeze"),
            helper.make_node("MatMul", ["v", "w"], ["h"], name="mm"),
            helper.make_node("Unsqueeze", ["h", "axis0"], ["y"], name="unsqueeze"),
        ],
        [tensor("x", [1, 32])],
        [tensor("y", [1, 24])],
        [init("w", _weight(32, 24)), numpy_helper.from_array(np.array([0], np.int64), "axis0")],
    )
    x = np.random.default_rng(8).standard_normal((64, 32)).astype(np.float32)
    report = _heal_case(tmp_path, model, x)
    healed = report["heal"]["plans"][0]["heal"]
    assert healed["path"] == "block" and "fixed at 1" in healed["reason"] and healed["steps"] == 5


def test_healing_a_float16_model(tmp_path):
    # The whole-graph path ran float16 ops beside float32 factors, and block training fed float16
    # captures to them: exit 4.
    half = TensorProto.FLOAT16
    model = single(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Relu", ["h"], ["y"], name="relu"),
        ],
        [tensor("x", ["N", 32], half)],
        [tensor("y", ["N", 24], half)],
        [numpy_helper.from_array(_weight(32, 24).astype(np.float16), "w")],
    )
    x = np.random.default_rng(9).standard_normal((64, 32)).astype(np.float16)
    report = _heal_case(tmp_path, model, x)
    healed = report["heal"]["plans"][0]["heal"]
    assert healed["path"] == "block" and "float16" in healed["reason"] and healed["steps"] == 5


def test_healing_with_an_input_fed_whole(tmp_path):
    # A 0-d `gain` input (no batch axis) was indexed by sample like the batched ones: exit 4.
    model = single(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Mul", ["h", "gain"], ["y"], name="scale"),
        ],
        [tensor("x", ["N", 32]), tensor("gain", [])],
        [tensor("y", ["N", 24])],
        [init("w", _weight(32, 24))],
    )
    rng = np.random.default_rng(10)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((64, 32)).astype(np.float32), gain=np.float32(2.0))
    for path in ("graph", "block"):
        report = tmp_path / f"r-{path}.json"
        run_case(
            tmp_path,
            save(model, tmp_path),
            "--rank-ratio",
            "0.5",
            "--data",
            tmp_path / "calib.npz",
            "--heal",
            "5",
            "--heal-path",
            path,
            "--report",
            report,
            expect=0,
        )
        assert json.loads(report.read_text())["heal"]["plans"][0]["heal"]["steps"] == 5


def test_healing_a_conv_transpose_with_auto_pad(tmp_path):
    # Its torch forward refuses auto_pad / output_shape: NotImplementedError at the first step (exit 4).
    model = single(
        helper.make_node(
            "ConvTranspose", ["x", "w"], ["y"], name="up", strides=[2, 2], auto_pad="SAME_UPPER"
        ),
        [tensor("x", ["N", 16, 5, 5])],
        [tensor("y", ["N", 12, 10, 10])],
        [init("w", _low_rank(16, 12 * 9, 4).reshape(16, 12, 3, 3))],
    )
    x = np.random.default_rng(11).standard_normal((64, 16, 5, 5)).astype(np.float32)
    report = _heal_case(tmp_path, model, x)
    healed = report["heal"]["plans"][0]["heal"]
    assert healed["path"] == "block" and "auto_pad" in healed["reason"]


def test_healing_unnamed_nodes_through_the_whole_graph(tmp_path):
    # Layers of unnamed nodes are addressed by the names tnopt gives them on import (MatMul_0); the
    # torch graph read the empty names and found no node to replace (KeyError, exit 4).
    model = single(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        [tensor("x", ["N", 32])],
        [tensor("y", ["N", 24])],
        [init("w", _weight(32, 24))],
    )
    x = np.random.default_rng(12).standard_normal((64, 32)).astype(np.float32)
    report = _heal_case(tmp_path, model, x)
    healed = report["heal"]["plans"][0]["heal"]
    assert healed["path"] == "graph" and healed["steps"] == 5


def test_a_matmul_constant_with_leading_dims_of_1_is_rewritten_as_its_matrix(tmp_path):
    # x (N, S, 16) @ W (1, 16, 12) (and (1, 1, 12, 8) on a 4-D input): MatMul's broadcasting makes the
    # leading 1s no-ops, yet such weights were skipped ("weight has 3 dims; only a 2-D weight …").
    # A stack of real matrices (2, 8, 6) and a weight of higher rank than its input get reasons.
    nodes = [
        helper.make_node("MatMul", ["x", "w3"], ["h"], name="mm3"),
        helper.make_node("Unsqueeze", ["h", "axis1"], ["h4"], name="unsqueeze"),
        helper.make_node("MatMul", ["h4", "w4"], ["g"], name="mm4"),
        helper.make_node("Concat", ["g", "g"], ["gg"], name="concat", axis=1),
        helper.make_node("MatMul", ["gg", "stack"], ["y"], name="stacked"),
        helper.make_node("ReduceMean", ["x"], ["m"], name="mean", axes=[1], keepdims=0),
        helper.make_node("MatMul", ["m", "w_up"], ["y2"], name="rank_up"),
    ]
    model = single(
        nodes,
        [tensor("x", ["N", "S", 16])],
        [tensor("y", ["N", 2, "S", 6]), tensor("y2", [1, "N", 12])],
        [
            init("w3", _low_rank(16, 12, 12).reshape(1, 16, 12)),
            init("w4", _low_rank(12, 8, 8, seed=1).reshape(1, 1, 12, 8)),
            init("stack", _weight(2, 8, 6)),
            init("w_up", _weight(16, 12, seed=2).reshape(1, 16, 12)),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        ],
        opset=13,
    )
    x = np.random.default_rng(13).standard_normal((32, 5, 16)).astype(np.float32)
    out, layers = rewrite(tmp_path, model, x=x)
    assert layers["mm3"]["decision"] == "rewritten" and layers["mm4"]["decision"] == "rewritten"
    assert layers["mm3"]["weight_shape"] == [16, 12]
    assert "is 2 separate (8, 6) matrices" in layers["stacked"]["reason"]
    assert "more dims than its input (of rank 2)" in layers["rank_up"]["reason"]
    fresh = {"x": np.random.default_rng(14).standard_normal((3, 7, 16)).astype(np.float32)}
    for expected, got in zip(run(model, fresh), run(out, fresh)):
        assert expected.shape == got.shape and relative_difference(expected, got) < 1e-4


def test_einsum_products_with_a_constant_matrix_are_rewritten_and_others_listed(tmp_path):
    # Einsum layers were not listed at all: a user saw nothing. "bij,jk->bik" (and a weight stored
    # (N, K), "...j,kj->...k") are x·W: rewritten as MatMul factors; a batched weight gets a reason.
    nodes = [
        helper.make_node("Einsum", ["x", "w"], ["h"], name="proj", equation="bij,jk->bik"),
        helper.make_node("Einsum", ["v", "h"], ["g"], name="proj_t", equation="...j,kj->...k"),
        helper.make_node("Einsum", ["g", "batched"], ["y"], name="per_step", equation="bij,ijk->bik"),
    ]
    nodes[1].input[:] = ["h", "v"]  # the activation first; the constant stored (N, K)
    model = single(
        nodes,
        [tensor("x", ["N", 5, 16])],
        [tensor("y", ["N", 5, 4])],
        [
            init("w", _low_rank(16, 12, 12)),
            init("v", _low_rank(10, 12, 10, seed=1)),
            init("batched", _weight(5, 10, 4, seed=2)),
        ],
    )
    x = np.random.default_rng(15).standard_normal((32, 5, 16)).astype(np.float32)
    out, layers = rewrite(tmp_path, model, x=x)
    assert layers["proj"]["decision"] == "rewritten" and layers["proj"]["weight_shape"] == [16, 12]
    assert layers["proj_t"]["decision"] == "rewritten" and layers["proj_t"]["weight_shape"] == [12, 10]
    assert "Einsum 'bij,ijk->bik' is not a product x·W" in layers["per_step"]["reason"]
    assert [n.op_type for n in out.graph.node].count("Einsum") == 1
    fresh = {"x": np.random.default_rng(16).standard_normal((3, 5, 16)).astype(np.float32)}
    assert relative_difference(run(model, fresh)[0], run(out, fresh)[0]) < 1e-4


def test_layers_inside_local_functions_are_listed_with_a_reason(tmp_path):
    # A MatMul inside ModelProto.functions was in no listing: the report said nothing of it.
    function = helper.make_function(
        "custom",
        "Dense",
        ["inp", "w"],
        ["out"],
        [helper.make_node("MatMul", ["inp", "w"], ["mm"]), helper.make_node("Relu", ["mm"], ["out"])],
        [helper.make_opsetid("", 17)],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Dense", ["x", "fw"], ["d"], name="block", domain="custom"),
            helper.make_node("MatMul", ["d", "hw"], ["y"], name="head"),
        ],
        "g",
        [tensor("x", ["N", 16])],
        [tensor("y", ["N", 10])],
        [init("fw", _weight(16, 24)), init("hw", _weight(24, 10, seed=1))],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)],
        ir_version=8,
        functions=[function],
    )
    listed = {layer.name: layer for layer in analyze(model)}
    inner = listed["block/Dense/MatMul_0"]
    assert inner.weight_shape == (16, 24) and inner.params == 384
    assert inner.skip_reason == (
        "inside the local function 'custom.Dense' (called by 'block'): local functions are kept as they are"
    )
    _, layers = rewrite(tmp_path, model)
    assert layers["head"]["decision"] == "rewritten"
    assert layers["block/Dense/MatMul_0"]["decision"] == "skipped"


def test_a_run_that_rewrites_nothing_writes_the_input_bytes_unchanged(tmp_path):
    # A budgeted run that kept every layer wrote a re-serialisation, 2 bytes longer per Constant
    # whose tensor has no name (torch's Clip bounds; real13: +138 bytes on EfficientNet-Lite0).
    def bound(value):
        return helper.make_node(
            "Constant", [], [f"c{value}"], value=numpy_helper.from_array(np.float32(value))
        )

    model = single(
        [
            helper.make_node("Conv", ["x", "w"], ["h"], name="conv", pads=[1, 1, 1, 1]),
            bound(0),
            bound(6),
            helper.make_node("Clip", ["h", "c0", "c6"], ["r"], name="relu6"),
            helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
            helper.make_node("Gemm", ["f", "w2"], ["y"], name="fc"),
        ],
        [tensor("x", ["N", 3, 6, 6])],
        [tensor("y", ["N", 10])],
        [init("w", _weight(8, 3, 3, 3)), init("w2", _weight(8 * 36, 10, seed=1))],
    )
    path = save(model, tmp_path)
    np.savez(
        tmp_path / "calib.npz", x=np.random.default_rng(17).standard_normal((64, 3, 6, 6)).astype(np.float32)
    )
    report = tmp_path / "r.json"
    args = ("--budget", "0.0001%", "--data", tmp_path / "calib.npz", "--report", report)
    run_case(tmp_path, path, *args, expect=0)
    assert not [layer for layer in decisions(report).values() if layer["decision"] == "rewritten"]
    assert (tmp_path / "out.onnx").read_bytes() == path.read_bytes()
    assert json.loads(report.read_text())["after"]["file_bytes"] == path.stat().st_size
