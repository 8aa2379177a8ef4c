"""Run an ONNX graph in torch, differentiably, with chosen nodes replaced by callables (for healing).

Not onnx2torch: that converter imports torchvision at package import (its NMS / RoIAlign converters),
and torchvision from PyPI does not import beside tnopt's CPU torch build; it also emits a torch.fx
module whose nodes would have to be swapped afterwards. This interpreter covers the ops of CNN
classifiers, MobileNet/EfficientNet-style nets and BERT-style encoders as torch exports them; a
graph with any other op raises `NotConvertible` (naming the ops) and healing falls back to its
block-local path, which needs no graph conversion.

Every op follows its ONNX definition for the opsets torch and tf2onnx export (axes given as
attributes or, from opset 13/18 on, as inputs). Integer tensors (shapes, token ids) flow as int64.
"""

from __future__ import annotations

from typing import Callable

import onnx
import torch

from tnopt.graph import unique_node_names
from tnopt.passes._torch import no_torch_form
from tnopt.torch_ops import OPS, NotConvertible, _attrs, _constant, _softmax, _tensor, resize_refusal

__all__ = ["NotConvertible", "TorchGraph", "unsupported_ops"]


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    return sorted(
        {n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx") or n.op_type not in OPS}
    )


class TorchGraph:
    """`model` as a torch function of its inputs; nodes named in `replacements` run the given
    callable instead, `fn(inputs: list[Tensor | None]) -> Tensor` (their inputs as the graph has them)."""

    def __init__(self, model: onnx.ModelProto, replacements: dict[str, Callable] | None = None):
        self.replacements = dict(replacements or {})
        # The names plans address nodes by (tnopt.graph names unnamed nodes on import).
        names = unique_node_names([(n.name, n.op_type) for n in model.graph.node])
        missing = [
            op
            for op in unsupported_ops(model)
            if not all(
                name in self.replacements for name, n in zip(names, model.graph.node) if n.op_type == op
            )
        ]
        if missing:
            raise NotConvertible(f"no torch form for op(s) {', '.join(missing)}")
        for node in model.graph.node:
            refused = no_torch_form(node.op_type, _attrs(node))
            if node.op_type == "Resize":
                refused = resize_refusal(_attrs(node))
            if refused:
                raise NotConvertible(f"{node.name or node.op_type}: {refused}")
        self.opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 17)
        self.constants = {t.name: _tensor(t) for t in model.graph.initializer}
        self.inputs = [i.name for i in model.graph.input if i.name not in self.constants]
        self.outputs = [o.name for o in model.graph.output]
        self.nodes = []
        for name, node in zip(names, model.graph.node):
            attrs = _attrs(node)
            if node.op_type == "Constant":
                self.constants[node.output[0]] = _constant(attrs)
                continue
            if node.op_type == "Split":
                attrs["_outputs"] = len(node.output)
            self.nodes.append((name, node.op_type, list(node.input), list(node.output), attrs))
        # Each value's last reader (node index): `run` drops it there, so a forward holds the live
        # tensors only (under no_grad, what the next ops need; with autograd, what backward saves)
        # rather than every activation of the model at once.
        self.last_use: dict[str, int] = {}
        for index, node in enumerate(self.nodes):
            for name in node[2]:
                if name and name not in self.constants:
                    self.last_use[name] = index
        found = {n[0] for n in self.nodes}
        absent = set(self.replacements) - found
        if absent:
            raise KeyError(f"no node named {sorted(absent)}")

    def run(self, feeds: dict[str, torch.Tensor], want: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Values of `want` (default: the graph outputs) for these feeds."""
        env: dict[str, torch.Tensor] = dict(self.constants)
        env.update(feeds)
        want = list(want or self.outputs)
        keep = set(want)
        for index, (name, op, inputs, outputs, attrs) in enumerate(self.nodes):
            args = [env[i] if i else None for i in inputs]
            if name in self.replacements:
                result = self.replacements[name](args)
            elif op == "Softmax":
                result = _softmax(args[0], attrs, self.opset)
            else:
                while args and args[-1] is None:
                    args.pop()
                result = OPS[op](*args, attrs=attrs)
            if isinstance(result, tuple):
                env.update(zip(outputs, result))
            else:
                env[outputs[0]] = result
            del args, result
            for value in inputs:
                if self.last_use.get(value) == index and value not in keep:
                    env.pop(value, None)
        return {name: env[name] for name in want}
