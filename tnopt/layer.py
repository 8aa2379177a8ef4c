"""`Layer`: the frozen record of one candidate layer (op, weight, attributes, shapes, costs, skip reason)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Layer:
    name: str
    op: str  # Conv | ConvTranspose | Gemm | MatMul
    # Conv: (O, I/group, *k); ConvTranspose: (I, O/group, *k); Gemm/MatMul: the effective (K, N) of y = x·W
    weight_shape: tuple[int, ...]
    params: int
    flops: int
    input_shape: tuple | None
    output_shape: tuple | None
    attrs: tuple[tuple[str, object], ...] = ()
    data_index: int = 0
    has_bias: bool = False
    weight_source: str = ""
    # Conv: positions (batch·spatial) at the input and output; Gemm/MatMul: rows M of x.
    in_positions: int = 1
    out_positions: int = 1
    skip_reason: str | None = None
    input_name: str = ""  # the activation tensor the layer reads (captured for statistics and timing)
    output_name: str = ""  # the tensor it writes (the target of the sequential correction)
    # Whether the bias (Conv B, Gemm C) is one value per output channel; an intercept refit needs it.
    bias_per_channel: bool = False
    weight: np.ndarray | None = field(default=None, repr=False, compare=False, hash=False)
    # The bias as one value per output channel (Conv B, Gemm beta·C) when it is constant and per
    # channel; None otherwise. The search's switchboard feeds it where a refit may replace it.
    bias: np.ndarray | None = field(default=None, repr=False, compare=False, hash=False)
    # Bytes the weight takes in the file as stored (int8 + scales for a dequantised weight), and
    # the stored dtype: a rewrite must not grow the file.
    weight_bytes: int = 0
    stored_dtype: str = ""
    # The input/output shapes at the calibration data's shapes (batch 1), where the data bound the
    # symbolic dims (at_data_shapes); costs read them, emitted subgraphs keep the symbolic ones.
    data_input_shape: tuple | None = None
    data_output_shape: tuple | None = None
    # Gemm/MatMul (weight on the right): the axes a Flatten/Reshape folded into K, e.g. (C, H, W), so
    # a method may read the weight's K axis as that geometry; None when not known.
    input_axes: tuple[int, ...] | None = None

    @property
    def candidate(self) -> bool:
        return self.skip_reason is None

    def attr(self, key: str, default=None):
        return dict(self.attrs).get(key, default)

    @property
    def group(self) -> int:
        return int(self.attr("group", 1))

    @property
    def out_channels(self) -> int:
        """Conv: O; ConvTranspose: (O/group)·group; Gemm/MatMul: N of y = x·W (K, N)."""
        if self.op == "Conv":
            return self.weight_shape[0]
        if self.op == "ConvTranspose":
            return self.weight_shape[1] * self.group
        return self.weight_shape[-1]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "op": self.op,
            "weight_shape": list(self.weight_shape),
            "params": self.params,
            "flops": self.flops,
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "output_shape": list(self.output_shape) if self.output_shape else None,
            "weight_source": self.weight_source,
            "weight_bytes": self.weight_bytes,
            "stored_dtype": self.stored_dtype,
            "candidate": self.candidate,
            "skip_reason": self.skip_reason,
        }
