"""Calibration and evaluation data: .npz files keyed by input name (+ optional `labels`), or a loud
seeded random fallback. Axis 0 of every array is the sample axis."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from tnopt.errors import DataError

LABELS_KEY = "labels"
# Symbolic dims other than the batch get this size when inputs are synthesised (e.g. sequence length).
SYNTHETIC_DIM = 16


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple  # ints or names of symbolic dims


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim
        )
        specs.append(InputSpec(value.name, onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type), shape))
    return specs


@dataclass
class Dataset:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str
    synthetic: bool = False

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def subset(self, indices, source: str | None = None) -> Dataset:
        return Dataset(
            {k: v[indices] for k, v in self.inputs.items()},
            None if self.labels is None else self.labels[indices],
            source or self.source,
            self.synthetic,
        )

    def split(self, fraction: float = 0.5) -> tuple[Dataset, Dataset]:
        """First part for calibration, the rest for evaluation (disjoint, order kept)."""
        cut = max(1, min(len(self) - 1, int(round(len(self) * fraction))))
        return (
            self.subset(slice(0, cut), f"{self.source}[:{cut}]"),
            self.subset(slice(cut, None), f"{self.source}[{cut}:]"),
        )

    def head(self, n: int) -> Dataset:
        return self if n >= len(self) else self.subset(slice(0, n), f"{self.source}[:{n}]")

    def fingerprint(self) -> str:
        import hashlib

        digest = hashlib.sha256()
        for key in sorted(self.inputs):
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(self.inputs[key]).tobytes())
        if self.labels is not None:
            digest.update(np.ascontiguousarray(self.labels).tobytes())
        return digest.hexdigest()[:16]


def load_npz(path: str | Path, specs: list[InputSpec]) -> Dataset:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such data file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except Exception as exc:
        raise DataError(f"{path}: not a readable .npz/.npy file ({str(exc).splitlines()[0][:120]})") from None
    labels = arrays.pop(LABELS_KEY, None)
    names = [s.name for s in specs]
    if len(specs) == 1 and names[0] not in arrays and len(arrays) == 1:
        # A single-input model with a single unnamed array: the mapping is unambiguous.
        arrays = {names[0]: next(iter(arrays.values()))}
    missing = [n for n in names if n not in arrays]
    if missing:
        raise DataError(
            f"{path}: no array for model input(s) {', '.join(missing)} (found: {', '.join(arrays)})"
        )
    inputs = {}
    for spec in specs:
        array = arrays[spec.name]
        if array.ndim != len(spec.shape):
            raise DataError(
                f"{path}: array {spec.name!r} has {array.ndim} dims, the model input has {len(spec.shape)}"
            )
        for axis, (got, want) in enumerate(zip(array.shape, spec.shape)):
            if axis > 0 and isinstance(want, int) and want > 0 and got != want:
                raise DataError(
                    f"{path}: array {spec.name!r} has shape {array.shape}, the model expects {spec.shape}"
                )
        inputs[spec.name] = array.astype(spec.dtype, copy=False)
    counts = {len(a) for a in inputs.values()}
    if len(counts) != 1:
        raise DataError(f"{path}: input arrays disagree on the number of samples ({sorted(counts)})")
    if labels is not None and len(labels) != counts.pop():
        raise DataError(f"{path}: 'labels' has {len(labels)} entries, the inputs have a different count")
    if labels is not None:
        labels = class_indices(labels, path)
    return Dataset(inputs, labels, str(path))


def class_indices(labels: np.ndarray, source) -> np.ndarray:
    """Labels as int64 class indices: (N,) or (N, 1) indices, or (N, C) one-hot / scores (argmax)."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] > 1:
        return labels.argmax(axis=1).astype(np.int64)
    if labels.ndim > 2:
        raise DataError(f"{source}: 'labels' has shape {labels.shape}; expected (N,), (N, 1) or (N, C)")
    return labels.reshape(len(labels)).astype(np.int64)


def random_inputs(specs: list[InputSpec], n: int = 64, seed: int = 0) -> Dataset:
    """Seeded synthetic inputs: good for fidelity metrics (agreement, cosine) only, never accuracy."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in specs:
        shape = [n] + [d if isinstance(d, int) and d > 0 else SYNTHETIC_DIM for d in spec.shape[1:]]
        if np.issubdtype(spec.dtype, np.floating):
            inputs[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif np.issubdtype(spec.dtype, np.integer) and "mask" in spec.name.lower():
            inputs[spec.name] = np.ones(shape, spec.dtype)
        elif np.issubdtype(spec.dtype, np.integer) and "type" in spec.name.lower():
            inputs[spec.name] = np.zeros(shape, spec.dtype)
        elif np.issubdtype(spec.dtype, np.integer):
            # Token ids: small values stay inside any vocabulary.
            inputs[spec.name] = rng.integers(0, 100, size=shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            inputs[spec.name] = np.ones(shape, np.bool_)
        else:
            raise DataError(f"cannot synthesise input {spec.name!r} of dtype {spec.dtype}; pass --data")
    return Dataset(inputs, None, f"random(seed={seed}, n={n})", synthetic=True)
