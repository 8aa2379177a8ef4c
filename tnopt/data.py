"""Calibration and evaluation data: .npz files keyed by input name (+ optional `labels`), a .npy for a
single-input model, or a loud seeded random fallback.

Inside tnopt every batched array is sample-major: its samples lie on axis 0, moved there from the
model input's batch axis (a recurrent state `[layers, N, H]` has its batch on axis 1). Inputs
without a batch axis (0-d scalars such as a sample rate, constant tensors) are fed as they are to
every batch. `Feeds` carries the arrays with each one's batch axis; the runtime moves it back.

The batch axis of each input is read from the model's symbolic dims: the dim named like a batch
(`N`, `batch`, `batch_size`, …), else the symbolic dim that most inputs share; `--batch-axis NAME:AXIS`
(AXIS an integer or `none`) overrides it. Data keeps the model input's dtype family: float data is
cast to a float input's precision, integer data to an integer input's width when every value fits,
and anything else (uint8 images for a float input) is an error naming the input — never a silent cast.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from tnopt.errors import DataError

LABELS_KEY = "labels"
# Symbolic dims other than the batch get this size when inputs are synthesised (e.g. sequence length).
SYNTHETIC_DIM = 16
_BATCH_LIKE = re.compile(r"(?i)^(n|b|bs|batch|batch_?size|.*batch.*|num_?samples)$")


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple  # ints or names of symbolic dims

    def describe(self) -> str:
        return "[" + ", ".join(str(d) for d in self.shape) + "]"


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


class IndexedRows:
    """Rows `index` (axis 0) of `base`, not copied: a slice of it is another such view, and its
    values are copied out only when asked for as an array (a batch, `Feeds.take` with an index
    array). The correction's seeded sample order over the calibration data without a second copy
    of the data set (ResNet-50, 512 crops: 308 MB per Corrector, two per run)."""

    def __init__(self, base: np.ndarray, index):
        self.base, self.index = base, np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple:
        return (len(self.index), *self.base.shape[1:])

    @property
    def dtype(self):
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return self.base.ndim

    @property
    def nbytes(self) -> int:
        return len(self.index) * (self.base.nbytes // max(len(self.base), 1))

    def __getitem__(self, key):
        if isinstance(key, slice):
            return IndexedRows(self.base, self.index[key])
        return self.base[self.index[key]]

    def __array__(self, dtype=None, copy=None):
        rows = self.base[self.index]
        return rows if dtype is None else rows.astype(dtype, copy=False)


class Feeds(dict):
    """Model inputs by name, sample-major: each batched array has its samples on axis 0, and
    `axes[name]` is the model's batch axis it came from (None: a constant fed whole every batch)."""

    def __init__(self, arrays: dict[str, np.ndarray], axes: dict[str, int | None] | None = None):
        super().__init__(arrays)
        self.axes = {name: (axes or {}).get(name, 0) for name in arrays}

    @property
    def batched(self) -> list[str]:
        return [name for name, axis in self.axes.items() if axis is not None]

    def samples(self) -> int:
        batched = self.batched
        return len(self[batched[0]]) if batched else 1

    def take(self, index) -> Feeds:
        """The samples `index` (a slice or an index array) of every batched array; constants kept."""
        return Feeds({k: (v[index] if self.axes[k] is not None else v) for k, v in self.items()}, self.axes)

    def view(self, index) -> Feeds:
        """As `take`, without copying the samples (IndexedRows): they are copied a batch at a time
        where they are run."""
        return Feeds(
            {k: (IndexedRows(v, index) if self.axes[k] is not None else v) for k, v in self.items()},
            self.axes,
        )

    def for_model(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A sample-major batch in the model's layout: each batch axis moved back where it belongs."""
        return {k: (np.moveaxis(v, 0, self.axes[k]) if self.axes.get(k) else v) for k, v in batch.items()}


def as_feeds(feeds) -> Feeds:
    return feeds if isinstance(feeds, Feeds) else Feeds(dict(feeds))


@dataclass
class Dataset:
    inputs: Feeds
    labels: np.ndarray | None
    source: str
    synthetic: bool = False

    def __post_init__(self):
        self.inputs = as_feeds(self.inputs)

    def __len__(self) -> int:
        return self.inputs.samples()

    def subset(self, indices, source: str | None = None) -> Dataset:
        return Dataset(
            self.inputs.take(indices),
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
            digest.update(f"{key}:{self.inputs.axes[key]}".encode())
            _hash_rows(digest, self.inputs[key])
        if self.labels is not None:
            digest.update(np.ascontiguousarray(self.labels).tobytes())
        return digest.hexdigest()[:16]


# Bytes hashed per step: a fingerprint never copies the whole data set (64 pages at 736² are 416 MB).
HASH_CHUNK_BYTES = 16 * 2**20


def _hash_rows(digest, array: np.ndarray) -> None:
    """digest.update(the array's C-order bytes) a few samples at a time: the same digest as hashing
    the whole contiguous copy, with one chunk in memory."""
    array = np.asarray(array)
    if array.ndim == 0 or array.flags.c_contiguous:
        digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
        return
    step = max(1, HASH_CHUNK_BYTES // max(array[:1].nbytes, 1))
    for start in range(0, len(array), step):
        digest.update(memoryview(np.ascontiguousarray(array[start : start + step])).cast("B"))


def parse_batch_axes(items) -> dict[str, int | None]:
    """`--batch-axis NAME:AXIS` values (AXIS an integer, or `none` for an input without one)."""
    result: dict[str, int | None] = {}
    if isinstance(items, dict):
        return dict(items)
    for item in items or ():
        name, sep, axis = str(item).rpartition(":")
        if not sep or not name:
            raise DataError(f"--batch-axis {item!r}: expected NAME:AXIS (AXIS an integer or 'none')")
        if axis.strip().lower() == "none":
            result[name] = None
            continue
        try:
            result[name] = int(axis)
        except ValueError:
            raise DataError(f"--batch-axis {item!r}: axis {axis!r} is not an integer or 'none'") from None
    return result


def batch_dim_name(specs: list[InputSpec]) -> str | None:
    """The symbolic dim that carries the batch: one named like a batch, else the one most inputs share."""
    counts: Counter = Counter()
    first_axis: dict[str, int] = {}
    for spec in specs:
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, str) and dim != "?" and dim not in spec.shape[:axis]:
                counts[dim] += 1
                first_axis[dim] = min(first_axis.get(dim, axis), axis)
    named = [d for d in counts if _BATCH_LIKE.match(d)]
    pool = named or [d for d in counts if counts[d] > 1]
    if not pool:
        return None
    return min(pool, key=lambda d: (-counts[d], first_axis[d]))


def infer_batch_axes(specs: list[InputSpec], overrides: dict[str, int | None] | None = None) -> dict:
    """Each input's batch axis (None: fed whole to every batch)."""
    overrides = dict(overrides or {})
    known = {s.name for s in specs}
    unknown = [n for n in overrides if n not in known]
    if unknown:
        raise DataError(
            f"--batch-axis names {', '.join(map(repr, unknown))}, not a model input "
            f"(inputs: {', '.join(sorted(known))})"
        )
    batch = batch_dim_name(specs)
    axes = {}
    for spec in specs:
        if spec.name in overrides:
            axis = overrides[spec.name]
            if axis is not None and not -len(spec.shape) <= axis < len(spec.shape):
                raise DataError(
                    f"--batch-axis {spec.name}:{axis}: input {spec.name!r} {spec.describe()} "
                    f"has no axis {axis}"
                )
            axes[spec.name] = None if axis is None else axis % len(spec.shape)
        elif not spec.shape:
            axes[spec.name] = None  # a 0-d input (a sample rate): the same value for every batch
        elif batch is not None and batch in spec.shape:
            axes[spec.name] = spec.shape.index(batch)
        elif batch is None and len(spec.shape) == 1 and isinstance(spec.shape[0], int):
            # Its one axis would be both the samples and the features a MatMul contracts: calibration
            # subsets of it fed a 16-wide moment to a 32-row weight (exit 4).
            raise DataError(
                f"input {spec.name!r} {spec.describe()} is a single vector with no batch axis: tnopt fits "
                f"and measures on samples; export the model with one (e.g. [N, {spec.shape[0]}]), or name it "
                f"with --batch-axis {spec.name}:0 if each value is a sample"
            )
        elif batch is None or len(specs) == 1:
            axes[spec.name] = 0
        else:
            axes[spec.name] = None  # no batch dim while other inputs have one: a constant tensor
    if specs and all(axis is None for axis in axes.values()):
        raise DataError(
            "no model input has a batch axis (all are constants); name one with --batch-axis NAME:AXIS"
        )
    return axes


def dataset_from_arrays(
    arrays: dict[str, np.ndarray],
    specs: list[InputSpec],
    source: str,
    batch_axes: dict[str, int | None] | None = None,
) -> Dataset:
    """Check `arrays` (model layout, keyed by input name, optional `labels`) against the model's
    inputs and return them sample-major. Every error names the input and, where it applies, the axis."""
    arrays = dict(arrays)
    labels = arrays.pop(LABELS_KEY, None)
    names = [s.name for s in specs]
    if len(specs) == 1 and names[0] not in arrays and len(arrays) == 1:
        # A single-input model with a single unnamed array: the mapping is unambiguous.
        arrays = {names[0]: next(iter(arrays.values()))}
    missing = [n for n in names if n not in arrays]
    if missing:
        raise DataError(
            f"{source}: no array for model input(s) {_some(missing)} (found: {_some(list(arrays)) or 'none'})"
        )
    strays = [k for k, v in arrays.items() if k not in names and np.ndim(v) == 0]
    if strays:
        raise DataError(
            f"{source}: array {strays[0]!r} is a single value (0-d) and names no model input "
            f"(inputs: {', '.join(names)}); a 0-d array feeds only a 0-d model input"
        )
    axes = infer_batch_axes(specs, batch_axes)
    inputs, counts = {}, {}
    for spec in specs:
        array = np.asarray(arrays[spec.name])
        axis = axes[spec.name]
        if axis is None and array.ndim == len(spec.shape) + 1 and len(spec.shape) == 0:
            raise DataError(
                f"{source}: input {spec.name!r} is 0-d (fed whole to every batch) but its array has shape "
                f"{array.shape}; give one value (a 0-d array)"
            )
        if array.ndim != len(spec.shape):
            raise DataError(
                f"{source}: array {spec.name!r} has {array.ndim} dims {array.shape}, the model input has "
                f"{len(spec.shape)} {spec.describe()}"
            )
        for dim_axis, (got, want) in enumerate(zip(array.shape, spec.shape)):
            if dim_axis == axis:
                continue
            if isinstance(want, int) and want > 0 and got != want:
                raise DataError(
                    f"{source}: input {spec.name!r} axis {dim_axis} has size {got}, the model expects "
                    f"{want} (model shape {spec.describe()}"
                    + (f", batch on axis {axis})" if axis is not None else ", no batch axis)")
                )
        array = _keep_dtype(array, spec, source)
        if axis is None:
            inputs[spec.name] = array
        else:
            inputs[spec.name] = np.moveaxis(array, axis, 0) if axis else array
            counts[spec.name] = (array.shape[axis], axis)
    if len({n for n, _ in counts.values()}) > 1:
        listed = ", ".join(f"{name!r} has {n} on axis {axis}" for name, (n, axis) in counts.items())
        raise DataError(f"{source}: inputs disagree on the number of samples: {listed}")
    feeds = Feeds(inputs, axes)
    if labels is not None:
        labels = class_indices(labels, source)
        if len(labels) != feeds.samples():
            raise DataError(
                f"{source}: 'labels' has {len(labels)} entries, the inputs have {feeds.samples()} samples"
            )
    return Dataset(feeds, labels, source)


def _some(names: list[str], shown: int = 5) -> str:
    """The first few names and how many in all: a model whose weights are all graph inputs (IR 3
    exports list every initializer there) made this one error line 15 KB of names."""
    if len(names) <= shown:
        return ", ".join(names)
    return f"{', '.join(names[:shown])}, … ({len(names)} in all)"


def _keep_dtype(array: np.ndarray, spec: InputSpec, source: str) -> np.ndarray:
    want, got = np.dtype(spec.dtype), array.dtype
    if want.kind == "f":
        if got.kind != "f":
            raise DataError(
                f"{source}: input {spec.name!r} is {want} but its array is {got}; convert (and scale) it "
                "yourself, tnopt does not cast integer data to float silently"
            )
        return array.astype(want, copy=False)
    if want.kind in "iu":
        if got.kind not in "iu":
            raise DataError(f"{source}: input {spec.name!r} is {want} but its array is {got}")
        if array.size and (array.min() < np.iinfo(want).min or array.max() > np.iinfo(want).max):
            raise DataError(f"{source}: input {spec.name!r} ({want}) has values outside the {want} range")
        return array.astype(want, copy=False)
    if want.kind == "b":
        if got.kind != "b" and not (got.kind in "iu" and np.isin(array, (0, 1)).all()):
            raise DataError(f"{source}: input {spec.name!r} is bool but its array is {got}")
        return array.astype(want, copy=False)
    if got != want:
        raise DataError(f"{source}: input {spec.name!r} is {want} but its array is {got}")
    return array


def load_npz(path: str | Path, specs: list[InputSpec], batch_axes=None) -> Dataset:
    """A .npz keyed by input name (+ `labels`), or a .npy holding the one input of a single-input model."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such data file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a .npz or .npy file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            arrays = {"": loaded}
        else:
            with loaded as archive:
                arrays = {k: archive[k] for k in archive.files}
    except Exception as exc:
        raise DataError(f"{path}: not a readable .npz/.npy file ({str(exc).splitlines()[0][:120]})") from None
    if "" in arrays and len(specs) != 1:
        raise DataError(
            f"{path}: a .npy holds one array, the model has {len(specs)} inputs "
            f"({', '.join(s.name for s in specs)}); use a .npz keyed by input name"
        )
    return dataset_from_arrays(arrays, specs, str(path), batch_axes)


def class_indices(labels: np.ndarray, source) -> np.ndarray:
    """Labels as int64 class indices: (N,) or (N, 1) indices, or (N, C) one-hot / scores (argmax)."""
    labels = np.asarray(labels)
    if labels.ndim == 0:
        raise DataError(f"{source}: 'labels' is a single value; expected one label per sample")
    if labels.ndim == 2 and labels.shape[1] > 1:
        return labels.argmax(axis=1).astype(np.int64)
    if labels.ndim > 2:
        raise DataError(f"{source}: 'labels' has shape {labels.shape}; expected (N,), (N, 1) or (N, C)")
    return labels.reshape(len(labels)).astype(np.int64)


def random_inputs(specs: list[InputSpec], n: int = 64, seed: int = 0, batch_axes=None) -> Dataset:
    """Seeded synthetic inputs: good for fidelity metrics (agreement, cosine) only, never accuracy."""
    rng = np.random.default_rng(seed)
    axes = infer_batch_axes(specs, batch_axes)
    inputs = {}
    for spec in specs:
        axis = axes[spec.name]
        dims = [d if isinstance(d, int) and d > 0 else SYNTHETIC_DIM for d in spec.shape]
        shape = dims if axis is None else [n] + dims[:axis] + dims[axis + 1 :]
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
    return Dataset(Feeds(inputs, axes), None, f"random(seed={seed}, n={n})", synthetic=True)
