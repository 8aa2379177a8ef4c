"""Load models (checker, shape inference, IR/opset kept) and save them atomically.

Saving writes a temporary file beside the target, checks it with onnx.checker and an onnxruntime
load, and only then renames it over the target, so a failed run never leaves a partial file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import onnx

from tnopt.errors import InternalError, OutputError, UnsupportedModelError, ValidationError

MIN_OPSET = 11
# Protobuf cannot serialize a single message above 2 GiB; bigger models keep weights outside.
_PROTO_LIMIT = 2**31 - 1


def load_model(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Read, check and shape-infer a model. The caller's ModelProto is copied, never modified."""
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
        raise UnsupportedModelError(f"{where}: opset {opset} is below the supported minimum {MIN_OPSET}")
    try:
        onnx.checker.check_model(model, full_check=False)
    except Exception as exc:
        raise UnsupportedModelError(f"{where}: fails onnx.checker ({_first_line(exc)})") from None
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        # Shape inference is a convenience (FLOP counts); a model ORT runs without it is still fine.
        inferred = model
    # infer_shapes can rewrite nothing but value_info; keep the original IR version explicitly.
    inferred.ir_version = model.ir_version
    return inferred


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


def save_model_atomic(model: onnx.ModelProto, output: str | os.PathLike, *, verify_session=None) -> int:
    """Write `model` to `output` only after it passed onnx.checker and an onnxruntime load.

    `verify_session` is a callable taking the serialized bytes and raising on a failed load (the
    runtime module provides it; io stays free of onnxruntime). Returns the written file size.
    """
    out = Path(output)
    if model.ByteSize() > _PROTO_LIMIT:
        raise OutputError(f"{out}: model above 2 GiB; external-data output is not supported yet")
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
        # mkstemp makes the file private (0600); a saved model gets the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        os.replace(tmp_name, out)
    except OSError as exc:
        raise OutputError(f"{out}: cannot write ({exc.strerror})") from None
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return len(payload)


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
