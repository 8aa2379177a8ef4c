"""Every option, path and data file a run is given, checked before a weight is read or a session runs.

The CLI calls `check_cli_paths` (output, report, plot, cache) and the pipeline's `compress` calls
`check_run_options` first thing, so a mistake costs nothing and leaves nothing behind: one
`TnoptError` line, exit 2. Data files are read member by member (memory grows with one array, not
the file) to refuse what no model can use — no arrays, strings, zero samples, NaN/Inf, scalar or
text labels. Whether the arrays fit the *model* (names, shapes) is `tnopt.data.load_npz`'s job.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import zipfile
from numbers import Integral, Real
from pathlib import Path

import numpy as np

from tnopt.budget import parse_budget
from tnopt.errors import DataError, OutputError, TnoptError

LABELS_KEY = "labels"
OBJECTIVES = ("params", "flops", "latency")
PROVIDERS = ("auto", "cpu", "cuda")
MIN_MPO_CORES = 2
# More cores than this only adds size-1 modes to any layer tnopt can meet.
MAX_MPO_CORES = 16
# dtype kinds a data array may have: bool, signed/unsigned integer, float.
NUMERIC_KINDS = "biuf"


def check_run_options(
    *,
    methods=None,
    rank_ratio=None,
    energy=None,
    ranks=None,
    budget=None,
    data=None,
    eval_data=None,
    metric=None,
    provider="auto",
    objective="flops",
    cache_dir=None,
    seed=0,
    mpo_cores=None,
    min_layer_params=0,
    exclude=None,
    time_limit=None,
) -> None:
    """Raise TnoptError (one line) for the first option that cannot work; reads no model."""
    rules = [
        flag
        for flag, value in (
            ("--rank-ratio", rank_ratio),
            ("--energy", energy),
            ("ranks", ranks),
            ("--budget", budget),
        )
        if value is not None
    ]
    if len(rules) > 1:
        raise TnoptError(f"give one rank rule, not {' and '.join(rules)}")
    if rank_ratio is not None:
        _fraction("--rank-ratio", rank_ratio, "e.g. 0.5 keeps half of each layer's rank")
    if energy is not None:
        _fraction("--energy", energy, "e.g. 0.95 keeps 95% of the singular-value energy")
    if ranks is not None and not isinstance(ranks, dict):
        raise TnoptError(f"ranks must map layer names to ranks, got {type(ranks).__name__}")
    if budget is not None:
        parse_budget(budget)
        if data is None:
            raise TnoptError(
                "--budget needs --data: a budget charged on random inputs promises nothing about your task"
            )
    if time_limit is not None:
        if isinstance(time_limit, bool) or not isinstance(time_limit, Real) or not math.isfinite(time_limit):
            raise TnoptError(f"--time-limit must be a number of seconds, got {time_limit!r}")
        if time_limit <= 0:
            raise TnoptError(f"--time-limit must be more than 0 seconds, got {time_limit:g}")
        if budget is None:
            raise TnoptError("--time-limit bounds the budgeted search: give --budget too")
    if eval_data is not None and data is None:
        raise TnoptError(
            "--eval-data needs --data too: tnopt would otherwise calibrate on the evaluation set"
        )
    _methods(methods)
    _choice("--objective", objective, OBJECTIVES)
    _choice("--provider", provider, PROVIDERS)
    _integer("--seed", seed, minimum=0)
    _integer("--min-layer-params", min_layer_params, minimum=0)
    if mpo_cores is not None:
        _integer("--mpo-cores", mpo_cores, minimum=MIN_MPO_CORES, maximum=MAX_MPO_CORES)
    if exclude is not None:
        try:
            re.compile(exclude)
        except (re.error, TypeError) as exc:
            raise TnoptError(f"--exclude {exclude!r} is not a regular expression ({exc})") from None
    if cache_dir is not None:
        check_cache_dir(cache_dir)
    for flag, source in (("--data", data), ("--eval-data", eval_data)):
        if source is not None:
            check_data_source(source, flag)
    _metric(metric, data, eval_data)


def check_cli_paths(model, output, report=None, plot=None) -> None:
    """The files the CLI will write: each must be creatable, none may be the input or another."""
    from tnopt import io

    io.check_output_path(output, model)
    seen = {"-o": Path(output).resolve()}
    for flag, path in (("--report", report), ("--plot", plot)):
        if path is None:
            continue
        target = Path(path)
        resolved = target.resolve()
        for other, where in seen.items():
            if resolved == where:
                raise OutputError(f"{flag} {path}: the same file as {other}")
        if Path(model).exists() and resolved == Path(model).resolve():
            raise OutputError(f"{flag} {path}: would overwrite the input model")
        _creatable(target, flag)
        seen[flag] = resolved


def check_cache_dir(cache_dir) -> None:
    if not isinstance(cache_dir, (str, os.PathLike)):
        raise TnoptError(f"--cache must be a directory path, got {type(cache_dir).__name__}")
    if str(cache_dir) in ("None", ""):
        # str(None) once wrote a cache directory named "None" into the source tree.
        raise TnoptError(f"--cache {str(cache_dir)!r} is not a directory name; pass None for no cache")
    path = Path(cache_dir)
    if path.exists() and not path.is_dir():
        raise TnoptError(f"--cache {cache_dir}: is a file, not a directory")
    # The cache is created on first use: its nearest existing ancestor must be a directory.
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise TnoptError(f"--cache {cache_dir}: {ancestor} is a file, so the directory cannot be made")


def check_data_source(source, flag: str = "--data") -> None:
    """A .npz path, a dict of arrays, or a tnopt Dataset: refuse what no model could use."""
    from tnopt.data import Dataset

    if isinstance(source, Dataset):
        _check_arrays(source.inputs.items(), source.source)
        return
    if isinstance(source, dict):
        arrays = [(k, np.asarray(v)) for k, v in source.items() if k != LABELS_KEY]
        _check_arrays(arrays, f"{flag} (in memory)")
        if source.get(LABELS_KEY) is not None:
            _check_labels(np.asarray(source[LABELS_KEY]), f"{flag} (in memory)")
        return
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(f"{flag} must be a .npz path or a dict of arrays, got {type(source).__name__}")
    check_npz_file(source, flag)


def check_npz_file(path, flag: str = "--data") -> None:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such data file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a .npz file")
    if _is_npy(path):
        # One bare array (a single-input model's data): whether the model has one input is
        # tnopt.data.load_npz's to say.
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"{path}: not a readable .npy array ({exc})") from None
        _check_header(path.stem, array.shape, array.dtype, path)
        if array.dtype.kind == "f":
            _check_finite(path.stem, array, path)
        return
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not a .npz archive (np.savez writes one)")
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.namelist() if not m.endswith("/")]
            if not members:
                raise DataError(f"{path}: the archive holds no arrays")
            strays = [m for m in members if not m.endswith(".npy")]
            if strays:
                raise DataError(f"{path}: member {strays[0]!r} is not a .npy array")
            headers = {m[: -len(".npy")]: _npy_header(archive, m, path) for m in members}
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz archive ({exc})") from None
    inputs = [(k, header) for k, header in headers.items() if k != LABELS_KEY]
    if not inputs:
        raise DataError(f"{path}: holds only 'labels', no input arrays")
    for name, (shape, dtype) in inputs:
        _check_header(name, shape, dtype, path)
    if LABELS_KEY in headers:
        shape, dtype = headers[LABELS_KEY]
        _check_label_header(shape, dtype, path)
    # Values: one array in memory at a time.
    with np.load(path, allow_pickle=False) as archive:
        for name, (_, dtype) in inputs:
            if dtype.kind == "f":
                _check_finite(name, archive[name], path)
        if LABELS_KEY in headers and headers[LABELS_KEY][1].kind == "f":
            _check_finite(LABELS_KEY, archive[LABELS_KEY], path)


def _npy_header(archive: zipfile.ZipFile, member: str, path) -> tuple[tuple, np.dtype]:
    with archive.open(member) as handle:
        try:
            version = np.lib.format.read_magic(handle)
            reader = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = reader(handle)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"{path}: member {member!r} is not a readable .npy array ({exc})") from None
    return tuple(shape), np.dtype(dtype)


def _check_header(name: str, shape: tuple, dtype: np.dtype, where) -> None:
    if dtype.kind not in NUMERIC_KINDS:
        raise DataError(f"{where}: array {name!r} has dtype {dtype}; inputs must be numbers or booleans")
    # A 0-d array is a model input without a batch axis (a sample rate): tnopt.data checks it
    # against the model, which alone knows whether such an input exists.
    if len(shape) >= 1 and shape[0] == 0:
        raise DataError(f"{where}: array {name!r} has 0 samples (shape {shape})")


def _check_label_header(shape: tuple, dtype: np.dtype, where) -> None:
    if len(shape) == 0:
        raise DataError(f"{where}: 'labels' is a single value; give one label per sample (shape (N,))")
    if dtype.kind not in NUMERIC_KINDS:
        raise DataError(
            f"{where}: 'labels' has dtype {dtype}; labels must be class indices (integers) or one-hot rows"
        )
    if shape[0] == 0:
        raise DataError(f"{where}: 'labels' has 0 entries")


def _check_arrays(arrays, where) -> None:
    arrays = list(arrays)
    if not arrays:
        raise DataError(f"{where}: no input arrays")
    for name, array in arrays:
        array = np.asarray(array)
        _check_header(name, array.shape, array.dtype, where)
        if array.dtype.kind == "f":
            _check_finite(name, array, where)


def _check_labels(labels: np.ndarray, where) -> None:
    _check_label_header(labels.shape, labels.dtype, where)
    if labels.dtype.kind == "f":
        _check_finite(LABELS_KEY, labels, where)


def _check_finite(name: str, array: np.ndarray, where) -> None:
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        sample = int(np.argwhere(~finite)[0][0]) if array.ndim else 0
        raise DataError(
            f"{where}: array {name!r} holds {bad} NaN/Inf value{'s' if bad > 1 else ''} "
            f"(first in sample {sample}); clean the data first"
        )


def _fraction(flag: str, value, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise TnoptError(f"{flag} must be a number in (0, 1], got {value!r} ({example})")
    if not 0 < float(value) <= 1:
        raise TnoptError(f"{flag} must be in (0, 1], got {value:g} ({example})")


def _integer(flag: str, value, *, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TnoptError(f"{flag} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        allowed = f"≥ {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise TnoptError(f"{flag} must be {allowed}, got {value}")


def _choice(flag: str, value, choices) -> None:
    if value not in choices:
        raise TnoptError(f"{flag} {value!r}: choose one of {', '.join(choices)}")


def _methods(methods) -> None:
    from tnopt.passes import METHODS

    if methods in (None, "auto"):
        return
    if isinstance(methods, str):
        names = [n.strip() for n in methods.split(",")]
    elif isinstance(methods, (list, tuple)):
        names = list(methods)
    else:
        raise TnoptError(f"--method must be 'auto' or a comma list, got {type(methods).__name__}")
    unknown = [repr(n) for n in names if n not in METHODS]
    if unknown or not names:
        raise TnoptError(
            f"unknown method(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(METHODS)} or auto"
        )


def _metric(metric, data, eval_data) -> None:
    from tnopt.metrics import METRICS, Metric
    from tnopt.task_metrics import MetricRequest, TaskMetric, known_names, parse_spec

    if isinstance(metric, MetricRequest):
        metric = metric.spec
    if metric is None or callable(metric) or isinstance(metric, (Metric, TaskMetric)):
        return
    if metric not in METRICS:
        if parse_spec(metric) is not None:  # a task metric or plug-in: parsed (and imported) here
            return
        raise TnoptError(f"--metric {metric!r}: choose from {', '.join(known_names())}")
    if not METRICS[metric].needs_labels:
        return
    if data is None:
        raise DataError(f"--metric {metric} needs labelled --data (random inputs have no labels)")
    for flag, source in (("--data", data), ("--eval-data", eval_data)):
        if source is not None and not _has_labels(source):
            raise DataError(f"--metric {metric} needs labels: {flag} has no 'labels' array")


def _has_labels(source) -> bool:
    from tnopt.data import Dataset

    if isinstance(source, Dataset):
        return source.labels is not None
    if isinstance(source, dict):
        return source.get(LABELS_KEY) is not None
    if _is_npy(Path(source)):
        return False
    with zipfile.ZipFile(source) as archive:
        return f"{LABELS_KEY}.npy" in archive.namelist()


def _is_npy(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(6) == b"\x93NUMPY"
    except OSError:
        return False


def _creatable(target: Path, flag: str) -> None:
    parent = target.resolve().parent
    if target.is_dir():
        raise OutputError(f"{flag} {target}: is a directory")
    if not parent.is_dir():
        raise OutputError(f"{flag} {target}: directory {parent} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    except OSError:
        raise OutputError(f"{flag} {target}: directory {parent} is not writable") from None
    os.close(fd)
    os.unlink(probe)


def check_model_outputs(model) -> None:
    """Every graph output must be computed from the inputs: tnopt compares outputs sample by sample,
    and a constant output (an initializer or Constant node wired straight out) has no samples."""
    constants = {t.name for t in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    inputs = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
    for output in model.graph.output:
        kind = output.type.WhichOneof("value")
        if kind != "tensor_type":
            what = {"sequence_type": "a sequence", "map_type": "a map", "optional_type": "an optional"}.get(
                kind, "not a dense tensor"
            )
            raise TnoptError(
                f"graph output {output.name!r} is {what} (e.g. scikit-learn's ZipMap), not a tensor; tnopt "
                "compares tensor outputs sample by sample (skl2onnx: convert with options={'zipmap': False})"
            )
        if output.name in constants:
            raise TnoptError(
                f"graph output {output.name!r} is a constant, not computed from the inputs; tnopt "
                "compares outputs sample by sample (make it an initializer the consumer reads instead)"
            )
        if output.name in inputs:
            raise TnoptError(
                f"graph output {output.name!r} is a graph input passed straight through; tnopt compares "
                "computed outputs only"
            )
