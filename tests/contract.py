"""The user-facing contract every case of the hardening matrix is held to (issue 12):

- the exit code is the one expected;
- exit 2: exactly one stderr line `tnopt: error: …` containing the reason; nothing written;
- any exit: the input model's bytes unchanged, no temporary file left beside the output;
- exit 0/3: the output passes onnx.checker, loads in onnxruntime, and keeps the input's graph
  input/output names, element types and shapes (symbolic dims included), IR version and opsets.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from helpers import IR_VERSION, OPSET, cli, init, tensor
from onnx import helper


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save(model: onnx.ModelProto, folder: Path, name: str = "model.onnx") -> Path:
    path = folder / name
    path.write_bytes(model.SerializeToString())
    return path


def mlp(
    k=32,
    hidden=48,
    n=10,
    *,
    dtype=np.float32,
    opset=OPSET,
    ir_version=IR_VERSION,
    weights=None,
    check=True,
) -> onnx.ModelProto:
    """x (N, k) → Gemm → Relu → Gemm → y (N, n), weights of planted low rank unless given."""
    rng = np.random.default_rng(0)
    w1, w2 = weights or (
        rng.standard_normal((k, 8)) @ rng.standard_normal((8, hidden)),
        rng.standard_normal((hidden, 6)) @ rng.standard_normal((6, n)),
    )
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        [
            # C given: before opset 11 Gemm requires it.
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2"),
        ],
        "mlp",
        [tensor("x", ["N", k], elem)],
        [tensor("y", ["N", n], elem)],
        [
            onnx.numpy_helper.from_array(np.asarray(w1, dtype), "w1"),
            onnx.numpy_helper.from_array(np.asarray(w2, dtype), "w2"),
            onnx.numpy_helper.from_array(np.full(hidden, 0.1, dtype), "b1"),
            onnx.numpy_helper.from_array(np.full(n, -0.1, dtype), "b2"),
        ],
    )
    if ir_version < 4:
        graph.input.extend(
            helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in graph.initializer
        )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    if check:
        onnx.checker.check_model(model)
    return model


def single(node, inputs, outputs, initializers, opset=OPSET, extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(node if isinstance(node, list) else [node], "g", inputs, outputs, initializers)
    opsets = [helper.make_opsetid("", opset), *extra_opsets]
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)


def gemm_model(weight, name="fc") -> onnx.ModelProto:
    k, n = np.asarray(weight).shape
    return single(
        helper.make_node("Gemm", ["x", "w"], ["y"], name=name),
        [tensor("x", ["N", k])],
        [tensor("y", ["N", n])],
        [init("w", weight)],
    )


def _signature(values) -> list:
    out = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim] if t.HasField("shape") else None
        out.append((v.name, t.elem_type, dims))
    return out


def _data_inputs(model):
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def run_case(
    tmp_path: Path,
    model_path: Path,
    *args,
    expect: int,
    fragment: str | None = None,
    output: Path | None = None,
    extra_outputs=(),
):
    """Run `tnopt MODEL -o OUT -q --no-cache ARGS` in process and hold it to the contract."""
    output = output or tmp_path / "out.onnx"
    before = sha(model_path) if model_path.is_file() else None
    result = cli(model_path, "-o", output, "-q", "--no-cache", *args)
    assert result.returncode == expect, f"exit {result.returncode}, stderr: {result.stderr}"
    assert "Traceback" not in result.stderr
    if before is not None:
        assert sha(model_path) == before, "the input model was modified"
    assert not [p for p in output.parent.iterdir() if p.name.endswith(".tmp")], "temporary file left"
    if expect == 2:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tnopt: error:"), result.stderr
        if fragment is not None:
            assert fragment in lines[0], lines[0]
        assert not output.exists(), "exit 2 must write nothing"
        for extra in extra_outputs:
            assert not Path(extra).exists(), f"exit 2 wrote {extra}"
    if expect in (0, 3):
        assert_valid_output(model_path, output)
    return result


def assert_valid_output(model_path: Path, output: Path) -> onnx.ModelProto:
    original, produced = onnx.load(str(model_path)), onnx.load(str(output))
    onnx.checker.check_model(produced)
    ort.InferenceSession(produced.SerializeToString(), providers=["CPUExecutionProvider"])
    assert _signature(_data_inputs(produced)) == _signature(_data_inputs(original))
    assert _signature(produced.graph.output) == _signature(original.graph.output)
    assert [
        i.name for i in produced.graph.input if i.name not in {t.name for t in original.graph.initializer}
    ]
    assert produced.ir_version == original.ir_version
    assert [(o.domain, o.version) for o in produced.opset_import] == [
        (o.domain, o.version) for o in original.opset_import
    ]
    return produced


def decisions(report_path: Path) -> dict[str, dict]:
    import json

    return {layer["name"]: layer for layer in json.loads(report_path.read_text())["layers"]}
