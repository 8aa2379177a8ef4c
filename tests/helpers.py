"""Shared by every pass test: tiny model builders and the one numeric-equivalence check."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10  # onnxruntime 1.31 reads IR ≤ 13; onnx.helper would default to a newer one
OPSET = 17


def make_model(nodes, inputs, outputs, initializers=(), opset=OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def tensor(name, shape, dtype=TensorProto.FLOAT):
    """A graph input/output; an int shape means that many unknown dims (outputs ORT infers)."""
    if isinstance(shape, int):
        shape = [None] * shape
    return helper.make_tensor_value_info(name, dtype, shape)


def init(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(
        np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(np.asarray(a, np.float64)), 1e-30)
    )


def assert_equivalent(original: onnx.ModelProto, candidate: onnx.ModelProto, feeds: dict, rtol: float = 1e-5):
    """Both models run in onnxruntime on `feeds`; every output agrees within `rtol` (relative L2)."""
    expected, got = run(original, feeds), run(candidate, feeds)
    assert len(expected) == len(got)
    for e, g in zip(expected, got):
        assert e.shape == g.shape, (e.shape, g.shape)
        diff = relative_difference(e, g)
        assert diff <= rtol, f"outputs differ: relative L2 {diff:.3e} > {rtol:.0e}"


def planted_tucker(o, i, k, ranks, seed=0):
    """A kernel (o, i, *k) of exact Tucker rank `ranks` on its channel modes."""
    rng = np.random.default_rng(seed)
    core = rng.standard_normal((ranks[0], ranks[1], *k))
    u_out, u_in = rng.standard_normal((o, ranks[0])), rng.standard_normal((i, ranks[1]))
    return np.einsum("ab...,oa,ib->oi...", core, u_out, u_in).astype(np.float32)


def planted_matrix(k, n, rank, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((k, rank)) @ rng.standard_normal((rank, n))).astype(np.float32)


def op_count(model: onnx.ModelProto, op: str) -> int:
    return sum(node.op_type == op for node in model.graph.node)


class CliResult:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def cli(*args) -> CliResult:
    """`tnopt ARGS` in this process through the CLI's own main(argv): the same exit codes and
    output as a subprocess, without paying an interpreter start per case."""
    import contextlib
    import io

    from tnopt.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's own usage errors and --version
            code = exc.code if isinstance(exc.code, int) else 2
    return CliResult(code, out.getvalue(), err.getvalue())
