"""Load models (checker, shape inference, IR/opset kept) and save them atomically.

Saving writes a temporary file beside the target, checks it with onnx.checker and an onnxruntime
load, and only then renames it over the target, so a failed run never leaves a partial file.

Models whose weights live in external data files (and any model above protobuf's 2 GiB limit) are
saved the same way: the graph as OUT and the weights as OUT.data beside it. The pair is atomic:
both are written and checked in a private temporary folder next to the target, the weights are
renamed into place first under a name no existing file has, then the graph over OUT, so OUT
always names a complete pair (the old one or the new one). The input's files are only ever read.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import onnx
from onnx import external_data_helper

from tnopt.errors import InternalError, OutputError, UnsupportedModelError, ValidationError

MIN_OPSET = 11
# Protobuf cannot serialize a single message above 2 GiB; bigger models keep weights outside.
_PROTO_LIMIT = 2**31 - 1
# Tensors at least this big go to the external data file of an external-data output.
EXTERNAL_MIN_BYTES = 1024


def load_model(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Read, check and shape-infer a model. The caller's ModelProto is copied, never modified."""
    return load_model_declared(source)[0]


def load_model_and_outputs(
    source: str | os.PathLike | onnx.ModelProto,
) -> tuple[onnx.ModelProto, list[onnx.ValueInfoProto]]:
    """`load_model`, and the graph outputs as the model declared them before shape inference
    (which fills in the dims an exporter left unknown): the interface a written model keeps."""
    return load_model_declared(source)[:2]


def load_model_declared(
    source: str | os.PathLike | onnx.ModelProto,
) -> tuple[onnx.ModelProto, list[onnx.ValueInfoProto], frozenset[str]]:
    """`load_model_and_outputs`, and the names of the value_info entries the file itself declared
    (shape inference adds one per computed tensor; `keep_declared_value_info` drops those again)."""
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        where = "model"
    else:
        path = Path(source)
        where = str(path)
        if not path.exists():
            raise UnsupportedModelError(f"{path}: no such file")
        if path.is_dir():
            raise UnsupportedModelError(f"{path}: is a directory, expected an .onnx file")
        missing = [name for name in external_data_files(path) if not (path.parent / name).is_file()]
        if missing:
            raise UnsupportedModelError(
                f"{path}: its external data file {missing[0]!r} is missing (expected beside the model)"
            )
        try:
            # load_external_data resolves weights stored beside the file.
            model = onnx.load(str(path), load_external_data=True)
        except Exception as exc:  # protobuf and onnx raise assorted types on truncated or foreign bytes
            raise UnsupportedModelError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    if not model.graph.node:
        raise UnsupportedModelError(f"{where}: not an ONNX model (empty graph)")
    opset = default_opset(model)
    if opset is None:
        raise UnsupportedModelError(f"{where}: the model imports no default-domain opset")
    if opset < MIN_OPSET:
        raise UnsupportedModelError(
            f"{where}: opset {opset} is below the supported minimum {MIN_OPSET} (convert it first: "
            f"onnx.save(onnx.version_converter.convert_version(onnx.load(IN), {MIN_OPSET}), OUT))"
        )
    try:
        # Above 2 GiB the checker can only read the model from its file.
        big = model.ByteSize() > _PROTO_LIMIT
        onnx.checker.check_model(where if big and Path(where).exists() else model, full_check=False)
    except Exception as exc:
        raise UnsupportedModelError(f"{where}: fails onnx.checker ({_first_line(exc)})") from None
    declared = [onnx.ValueInfoProto.FromString(v.SerializeToString()) for v in model.graph.output]
    declared_value_info = frozenset(value.name for value in model.graph.value_info)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        # Shape inference is a convenience (FLOP counts); a model ORT runs without it is still fine.
        inferred = model
    # infer_shapes can rewrite nothing but value_info; keep the original IR version explicitly.
    inferred.ir_version = model.ir_version
    return inferred, declared, declared_value_info


def keep_declared_value_info(model: onnx.ModelProto, declared: frozenset[str]) -> onnx.ModelProto:
    """Drop (in place) the value_info entries that are not among `declared`: the shapes inferred at
    load and the types of emitted nodes are for tnopt's own use, and written out they made the output
    file larger than the input when nothing was rewritten (MTCNN P-Net: 28,519 -> 29,052 bytes);
    onnxruntime infers them again at load."""
    kept = [value for value in model.graph.value_info if value.name in declared]
    if len(kept) != len(model.graph.value_info):
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept)
    return model


def default_opset(model: onnx.ModelProto) -> int | None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return None


def model_bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


def serialized_size(model: onnx.ModelProto) -> int:
    return model.ByteSize()


def check_output_path(output: str | os.PathLike, input_path: str | os.PathLike | None) -> Path:
    """Refuse outputs that would overwrite the input or cannot be written, before any work is done."""
    out = Path(output)
    if input_path is not None and Path(input_path).exists():
        same_file = out.exists() and os.path.samefile(out, input_path)
        if same_file or out.resolve() == Path(input_path).resolve():
            raise OutputError(f"{out}: the output would overwrite the input model; choose another -o")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise OutputError(f"{out}: directory {parent} does not exist")
    if out.is_dir():
        raise OutputError(f"{out}: is a directory")
    # Really create a file: permission bits do not tell root, read-only mounts or /proc apart.
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent)
    except OSError:
        raise OutputError(f"{out}: directory {parent} is not writable") from None
    os.close(fd)
    os.unlink(probe)
    return out


def external_data_files(path: str | os.PathLike) -> list[str]:
    """The external data files a model file refers to (empty for a self-contained model)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return []
    return sorted(
        {
            external_data_helper.ExternalDataInfo(t).location
            for t in external_data_helper._get_all_tensors(model)
            if external_data_helper.uses_external_data(t)
        }
    )


def save_model_atomic(
    model: onnx.ModelProto, output: str | os.PathLike, *, verify_session=None, external_data: bool = False
) -> int:
    """Write `model` to `output` only after it passed onnx.checker and an onnxruntime load.

    `verify_session` is a callable taking the serialized bytes (or, for an external-data model, the
    path of the checked temporary file) and raising on a failed load (the runtime module provides
    it; io stays free of onnxruntime). `external_data`: weights go to OUT.data beside OUT (always so
    above 2 GiB). Returns the written size in bytes (graph plus weights).
    """
    out = Path(output)
    if external_data or model.ByteSize() > _PROTO_LIMIT:
        return _save_external_pair(model, out, verify_session)
    try:
        onnx.checker.check_model(model, full_check=False)
    except Exception as exc:
        raise _own_failure(model, f"compressed model fails onnx.checker ({_first_line(exc)})") from None
    payload = model.SerializeToString()
    if verify_session is not None:
        try:
            verify_session(payload)
        except Exception as exc:
            raise _own_failure(
                model, f"compressed model fails to load in onnxruntime ({_first_line(exc)})"
            ) from None
    _write_atomic(payload, out)
    return len(payload)


def copy_model_atomic(source: str | os.PathLike, output: str | os.PathLike, *, verify_session=None) -> int:
    """Write the bytes of the model file `source` to `output` unchanged, after the same checks as
    `save_model_atomic` (onnx.checker, an onnxruntime load) and as atomically: a run that rewrote
    nothing gives back the file it was given, not a re-serialisation of it (graphsurgeon's export
    added 2 bytes per Constant tensor). Self-contained models only. Returns the size in bytes."""
    payload = Path(source).read_bytes()
    model = onnx.load_model_from_string(payload)
    try:
        onnx.checker.check_model(model, full_check=False)
        if verify_session is not None:
            verify_session(payload)
    except Exception as exc:
        raise ValidationError(f"the unchanged model fails its checks ({_first_line(exc)})") from None
    _write_atomic(payload, Path(output))
    return len(payload)


def _write_atomic(payload: bytes, out: Path) -> None:
    """`payload` to `out` through a temporary file beside it, synced, then renamed over it."""
    parent = out.resolve().parent
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise OutputError(f"{out}: cannot write ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        _umask_mode(tmp_name)
        os.replace(tmp_name, out)
    except OSError as exc:
        raise OutputError(f"{out}: cannot write ({exc.strerror})") from None
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def _own_failure(model: onnx.ModelProto, message: str) -> Exception:
    """The input passed the same checks at load, so a failing output is tnopt's doing when it
    rewrote something (InternalError, exit 4); an untouched copy failing stays a ValidationError."""
    from tnopt.graph import rewritten_layers

    rewrites = rewritten_layers(model)
    if not rewrites:
        return ValidationError(message)
    where = ", ".join(f"{name} ({method})" for name, method in list(rewrites.items())[:4])
    return InternalError(f"{message}; rewrites: {where}")


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bytes_on_disk(path: str | os.PathLike) -> int:
    """Size of the model file plus every external-data file its tensors name (what a user ships)."""
    path = Path(path)
    total = path.stat().st_size
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return total
    locations = set()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {entry.key: entry.value for entry in tensor.external_data}
            if "location" in entries:
                locations.add(path.parent / entries["location"])
    return total + sum(p.stat().st_size for p in locations if p.is_file())


def _umask_mode(path) -> None:
    # mkstemp makes the file private (0600); a saved model gets the usual umask-based mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _save_external_pair(model: onnx.ModelProto, out: Path, verify_session) -> int:
    parent = out.resolve().parent
    previous = external_data_files(out) if out.exists() else []
    data_name = f"{out.name}.data"
    if (parent / data_name).exists():
        # Another file has that name (the previous output's weights, someone's input): the old pair
        # must stay whole until the graph is replaced, so these weights get a fresh name.
        data_name = f"{out.name}.{uuid.uuid4().hex[:8]}.data"
    try:
        folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    except OSError as exc:
        raise OutputError(f"{out}: cannot write ({exc.strerror})") from None
    try:
        staged = onnx.ModelProto()
        staged.CopyFrom(model)  # the conversion below rewrites tensors in place: never the caller's
        external_data_helper.convert_model_to_external_data(
            staged, all_tensors_to_one_file=True, location=data_name, size_threshold=EXTERNAL_MIN_BYTES
        )
        graph_file = folder / out.name
        try:
            onnx.save_model(staged, str(graph_file))
        except OSError as exc:
            raise OutputError(f"{out}: cannot write ({exc.strerror})") from None
        del staged
        try:
            onnx.checker.check_model(str(graph_file), full_check=False)
        except Exception as exc:
            raise ValidationError(f"compressed model fails onnx.checker ({_first_line(exc)})") from None
        if verify_session is not None:
            try:
                verify_session(str(graph_file))
            except Exception as exc:
                raise ValidationError(
                    f"compressed model fails to load in onnxruntime ({_first_line(exc)})"
                ) from None
        data_file = folder / data_name
        size = graph_file.stat().st_size + (data_file.stat().st_size if data_file.exists() else 0)
        try:
            for staged_file in (data_file, graph_file):
                if staged_file.exists():
                    with open(staged_file, "rb+") as handle:
                        os.fsync(handle.fileno())
                    _umask_mode(staged_file)
            if data_file.exists():
                os.replace(data_file, parent / data_name)
            os.replace(graph_file, out)
        except OSError as exc:
            raise OutputError(f"{out}: cannot write ({exc.strerror})") from None
        # The previous output's weights file, now referenced by nothing we wrote.
        for name in previous:
            stale = parent / name
            if name != data_name and stale.name.startswith(out.name) and stale.is_file():
                stale.unlink()
        return size
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
