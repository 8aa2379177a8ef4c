"""onnxruntime sessions: provider choice, batched runs, intermediate capture, latency timing.

Failures: a session or run of the user's model is the user's problem (`TnoptError`, exit 2); one of
a graph tnopt built itself (`own=True`: exported plans, boards, cut or isolated layers) is tnopt's
(`InternalError`, exit 4), never reported as bad input.

Provider policy: `cuda` demands the CUDA provider and fails loudly when a session does not get it
(onnxruntime-gpu lists CUDA as "available" even on machines without a GPU, so we test a real
session); `auto` uses CUDA when a session really gets it, else CPU; `cpu` is CPU.
"""

from __future__ import annotations

import contextlib
import functools
import io
import time

import numpy as np
import onnx
import onnxruntime as ort

from tnopt.data import as_feeds
from tnopt.errors import InternalError, TnoptError
from tnopt.session_weights import weightless_payload

# onnxruntime logs provider-library load failures (no CUDA here) to stderr on its own; tnopt reports
# the provider it got itself, in one line, so only fatal runtime messages may pass.
ort.set_default_logger_severity(3)

# Models above this many bytes get their sessions from files with external data (protobuf: 2 GiB).
SESSION_BYTES_LIMIT = 2**31 - 1
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def _quiet_options(spinning: bool = True) -> ort.SessionOptions:
    options = ort.SessionOptions()
    # Fatal only: a failed load or run raises, and tnopt reports it in one line of its own; the
    # executor's own error log would add a second, unformatted line to stderr.
    options.log_severity_level = 4
    if not spinning:
        # Timing sessions run interleaved: an idle session's worker threads spinning after its run
        # would take the cores from the session being timed (measured: a 2.3 ms conv timed 2-106 ms).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


@functools.lru_cache(maxsize=1)
def cuda_works() -> tuple[bool, str]:
    """Whether a session really runs on the CUDA provider here, and why not."""
    if CUDA not in ort.get_available_providers():
        return False, "this onnxruntime build has no CUDA provider"
    try:
        if hasattr(ort, "preload_dlls"):
            # It prints a line per missing CUDA library; the one-line reason below says it better.
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                ort.preload_dlls()
    except Exception:  # preloading is best effort; the session below is the real test
        pass
    from tnopt.graph import probe_model

    probe = probe_model()
    ort.set_default_logger_severity(4)  # a missing CUDA library is logged as an error; we say it ourselves
    try:
        session = ort.InferenceSession(probe.SerializeToString(), _quiet_options(), providers=[CUDA, CPU])
    except Exception as exc:
        return False, f"CUDA session failed ({str(exc).splitlines()[0][:120]})"
    finally:
        ort.set_default_logger_severity(3)
    if session.get_providers()[0] != CUDA:
        return False, "no usable CUDA device (the CUDA provider fell back to CPU)"
    return True, ""


def resolve_providers(choice: str = "auto") -> list[str]:
    if choice == "cpu":
        return [CPU]
    if choice not in ("auto", "cuda"):
        raise TnoptError(f"unknown provider {choice!r}; choose auto, cpu or cuda")
    works, why = cuda_works()
    if works:
        return [CUDA, CPU]
    if choice == "cuda":
        raise TnoptError(f"--provider cuda: {why}")
    return [CPU]


class Runtime:
    """Sessions on one provider list; every model evaluation in tnopt goes through here."""

    def __init__(self, provider: str = "auto", batch_size: int = 256):
        self.providers = resolve_providers(provider)
        self.batch_size = batch_size
        # Samples run through any session so far (padding included): ORT work, for the report.
        self.sample_forwards = 0

    @property
    def provider_name(self) -> str:
        return "cuda" if self.providers[0] == CUDA else "cpu"

    def session(
        self, model: onnx.ModelProto | bytes | str, *, own: bool = False, timing: bool = False
    ) -> ort.InferenceSession:
        """A session on `model` (a ModelProto, its bytes, or its file); `own`: tnopt built this
        graph, so a failure is an InternalError; `timing`: one of several sessions timed interleaved.
        Worker threads never spin between runs (measured beside 2-4 other busy processes: cnn4 at
        batch 16 5.6 vs 8.9 ms a run, at 256 103 vs 108 ms, ResNet-50 at 5 crops 0.49 s both ways).
        Above 2 GiB a model cannot be serialized into one message: it is staged as a file with
        external data."""
        # The large weights go to onnxruntime as arrays beside a skeleton graph, never through
        # protobuf's size check and encoding (tnopt/session_weights.py).
        staged = weightless_payload(model) if isinstance(model, onnx.ModelProto) else None
        if staged is not None:
            payload, weights = staged
            if len(payload) > SESSION_BYTES_LIMIT:
                return self._session_from_files(model, own, timing)
        elif isinstance(model, onnx.ModelProto) and model.ByteSize() > SESSION_BYTES_LIMIT:
            return self._session_from_files(model, own, timing)
        else:
            payload, weights = (model if isinstance(model, (bytes, str)) else model.SerializeToString()), {}
        where = _rewrites(model) if own else ""
        try:
            # No session spins: timing sessions run interleaved, and work sessions alternate with
            # tnopt's numpy work, which may run on every core (tnopt/threads.py).
            options = _quiet_options(spinning=False)
            values = [ort.OrtValue.ortvalue_from_numpy(v) for v in weights.values()]
            if weights:
                options.add_external_initializers(list(weights), values)
            session = ort.InferenceSession(payload, options, providers=self.providers)
        except Exception as exc:
            raise _failure(own, "cannot load", exc, where) from None
        session.tnopt_own, session.tnopt_where = own, where
        # onnxruntime reads the staged weights in place: they live as long as the session.
        session.tnopt_weights = (weights, values)
        return session

    def _session_from_files(self, model: onnx.ModelProto, own: bool, timing: bool) -> ort.InferenceSession:
        import tempfile

        from onnx import external_data_helper

        with tempfile.TemporaryDirectory(prefix="tnopt-session-") as folder:
            staged = onnx.ModelProto()
            staged.CopyFrom(model)
            external_data_helper.convert_model_to_external_data(
                staged, all_tensors_to_one_file=True, location="weights.data", size_threshold=1024
            )
            path = f"{folder}/model.onnx"
            onnx.save_model(staged, path)
            del staged
            # onnxruntime has read the weights when this returns
            return self.session(path, own=own, timing=timing)

    def verify_loads(self, payload: bytes | str) -> None:
        self.session(payload)

    def run(
        self, model_or_session, feeds: dict[str, np.ndarray], output_names=None, constants=None
    ) -> list[np.ndarray]:
        """Run over all samples (axis 0 of every feed) in batches; outputs concatenated on axis 0.
        `constants` are fed whole to every batch (weights given as inputs)."""
        chunks = [
            outputs for _, outputs in self.iter_batches(model_or_session, feeds, output_names, constants)
        ]
        return [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]

    def iter_batches(self, model_or_session, feeds, output_names=None, constants=None):
        """Yield (batch slice, outputs) per batch: statistics accumulate without holding every
        sample's activations at once. `feeds`: arrays (cut into batches here) or an iterable of such
        dicts, one per batch (a stream; each is cut again where it is larger). Arrays are
        sample-major (tnopt.data.Feeds: each batched input's samples on axis 0, constants fed
        whole); each batch goes to the model in its own layout, and every output comes back with
        its batch axis (found from the model's symbolic dims, else axis 0) moved to axis 0."""
        session = (
            model_or_session
            if isinstance(model_or_session, ort.InferenceSession)
            else self.session(model_or_session)
        )
        own, where = getattr(session, "tnopt_own", False), getattr(session, "tnopt_where", "")
        fixed = names = axes = None
        start = 0
        for chunk in [feeds] if isinstance(feeds, dict) else feeds:
            chunk = as_feeds(chunk)
            if fixed is None:
                fixed = fixed_batch(session, chunk) or 0
                names = output_names or [o.name for o in session.get_outputs()]
                axes = output_axes(session, chunk, names)
            step = fixed or self.batch_size
            batched = chunk.batched
            whole = {k: chunk[k] for k in chunk if k not in batched}
            n = chunk.samples()
            for offset in range(0, n, step):
                # np.asarray: a view of rows (tnopt.data.IndexedRows) is copied here, a batch at a time.
                batch = {k: np.asarray(chunk[k][offset : offset + step]) for k in batched}
                short = len(next(iter(batch.values())))
                if short < step and fixed:
                    # A model with a fixed batch dim gets the last chunk padded, then trimmed.
                    batch = {
                        k: np.concatenate([v, np.repeat(v[-1:], step - short, axis=0)])
                        for k, v in batch.items()
                    }
                try:
                    outputs = session.run(names, {**chunk.for_model(batch), **whole, **(constants or {})})
                except Exception as exc:
                    raise _failure(own, "failed to run", exc, where) from None
                self.sample_forwards += len(next(iter(batch.values())))
                yield (
                    slice(start, start + short),
                    [_sample_major(o, a, short, fixed) for o, a in zip(outputs, axes)],
                )
                start += short

    def with_outputs(self, model: onnx.ModelProto, tensor_names: list[str]) -> ort.InferenceSession:
        """A session on a copy of `model` that also returns the named intermediate tensors (typed
        from the model's inferred shapes where known, so their batch axis can be found)."""
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        existing = {o.name for o in probe.graph.output}
        known = {v.name: v for v in probe.graph.value_info}
        for name in tensor_names:
            if name not in existing:
                value = probe.graph.output.add()
                if name in known:
                    value.CopyFrom(known[name])
                else:
                    value.name = name
        return self.session(probe)

    def capture(self, model: onnx.ModelProto, tensor_names: list[str], feeds) -> dict[str, np.ndarray]:
        """Values of intermediate tensors on all of `feeds` (small inputs only: it keeps them all)."""
        values = self.run(self.with_outputs(model, tensor_names), feeds, output_names=list(tensor_names))
        return dict(zip(tensor_names, values))

    def capture_shapes(self, model: onnx.ModelProto, tensor_names: list[str], feeds) -> dict[str, tuple]:
        """Shapes of intermediate tensors in the model's own layout, from one batch of `feeds`."""
        feeds = as_feeds(feeds)
        session = self.with_outputs(model, tensor_names)
        # A model with a fixed batch dim takes exactly that many samples: fewer (the latency guard
        # asks for one) are repeated to fill it.
        size = fixed_batch(session, feeds) or min(self.batch_size, feeds.samples())
        first = feeds.take(np.arange(size) % feeds.samples())
        try:
            values = session.run(list(tensor_names), feeds.for_model(dict(first)))
        except Exception as exc:
            raise TnoptError(
                f"onnxruntime failed to run the model ({str(exc).splitlines()[0][:200]})"
            ) from None
        return {name: value.shape for name, value in zip(tensor_names, values)}

    def latency(
        self,
        model: onnx.ModelProto | bytes,
        feed: dict[str, np.ndarray],
        repeats: int = 20,
        warmup: int = 3,
        time_limit: float = 0.25,
    ) -> float:
        """Median wall time of one run in seconds (after warm-up): `repeats` runs, or as many as
        fit in `time_limit` seconds but at least 5 (big layers are stable; hundreds get timed)."""
        session = self.session(model, own=True)  # isolated layers and their rewrites: tnopt's graphs
        for _ in range(warmup):
            session.run(None, feed)
        times: list[float] = []
        while len(times) < repeats and (len(times) < 5 or sum(times) < time_limit):
            start = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - start)
        return float(np.median(times))


def _rewrites(model) -> str:
    """'; rewrites: layer (method), …' from the provenance tags of a graph tnopt built."""
    if not isinstance(model, onnx.ModelProto):
        return ""
    from tnopt.graph import rewritten_layers

    found = rewritten_layers(model)
    if not found:
        return ""
    listed = ", ".join(f"{name} ({method})" for name, method in list(found.items())[:4])
    return f"; rewrites: {listed}" + (f" and {len(found) - 4} more" if len(found) > 4 else "")


def _failure(own: bool, what: str, exc: Exception, where: str = "") -> Exception:
    detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    if own:
        return InternalError(f"onnxruntime {what} a graph tnopt built ({detail}){where}")
    return TnoptError(f"onnxruntime {what} the model ({detail})")


def _sample_major(value: np.ndarray, axis: int, samples: int, fixed: int) -> np.ndarray:
    """One run's output with its batch axis first and the padding trimmed. A batch-1 model runs
    one sample at a time, and a tensor it computes after squeezing the batch away (x[0] @ W) has no
    batch axis: that run's value is the one sample's, given a sample axis of its own."""
    if fixed == 1 and (np.ndim(value) <= axis or np.shape(value)[axis] != 1):
        return np.asarray(value)[None]
    return (np.moveaxis(value, axis, 0) if axis else value)[:samples]


def fixed_batch(session: ort.InferenceSession, feeds=None) -> int | None:
    """The static batch dim of the batched data inputs (on each one's batch axis), if any."""
    feeds = as_feeds(feeds) if feeds is not None else None
    fixed = []
    for value in session.get_inputs():
        if feeds is not None and (value.name not in feeds or feeds.axes[value.name] is None):
            continue
        axis = feeds.axes[value.name] if feeds is not None else 0
        if value.shape and axis < len(value.shape) and isinstance(value.shape[axis], int):
            fixed.append(value.shape[axis])
    return fixed[0] if fixed else None


def output_axes(session: ort.InferenceSession, feeds, names) -> list[int]:
    """Each fetched output's batch axis: where it carries a symbolic dim that the batched inputs
    carry on their batch axes (a state output `[layers, N, H]`: 1); axis 0 when nothing says."""
    feeds = as_feeds(feeds)
    batch_dims = set()
    for value in session.get_inputs():
        axis = feeds.axes.get(value.name)
        if (
            axis is not None
            and value.shape
            and axis < len(value.shape)
            and isinstance(value.shape[axis], str)
        ):
            batch_dims.add(value.shape[axis])
    shapes = {o.name: o.shape for o in session.get_outputs()}
    axes = []
    for name in names:
        shape = shapes.get(name) or []
        found = [i for i, d in enumerate(shape) if isinstance(d, str) and d in batch_dims]
        axes.append(found[0] if found else 0)
    return axes


# One batch's activations (every tensor the model computes, per tnopt.layout.activation_bytes) stay
# under this: memory grows with one batch, not with the data set.
BATCH_ACTIVATION_BUDGET = 512 * 2**20
MAX_BATCH = 256
# A dynamic-batch copy must reproduce one-sample-at-a-time outputs to this relative L2 (float
# round-off of batched kernels), else the fixed batch is kept.
SAME_OUTPUTS_RTOL = 1e-5


def batch_size_for(sample_bytes: int) -> int:
    """Samples per onnxruntime run, from the bytes one sample's activations take."""
    return int(max(1, min(MAX_BATCH, BATCH_ACTIVATION_BUDGET // max(int(sample_bytes), 1))))


def batched_working_model(model: onnx.ModelProto, feeds, runtime: Runtime):
    """(model to run, note): a model with a fixed batch dim is replaced by a dynamic-batch copy
    when that copy gives the same outputs as the original on a few samples (one fixed batch at a
    time); else the original, run a fixed batch at a time. The note says what was decided."""
    from tnopt.layout import dynamic_batch_copy, fixed_batch_size

    feeds = as_feeds(feeds)
    fixed = fixed_batch_size(model, feeds)
    if fixed is None or feeds.samples() <= fixed:
        return model, None
    copy = dynamic_batch_copy(model, feeds, fixed)
    probe = feeds.take(slice(0, min(feeds.samples(), max(2 * fixed, 4))))
    saved = runtime.batch_size
    try:
        expected = runtime.run(model, probe)
        runtime.batch_size = probe.samples()
        got = runtime.run(copy, probe)
    except TnoptError as exc:
        return model, f"fixed batch {fixed}; a dynamic-batch copy does not run ({exc}); run {fixed} at a time"
    finally:
        runtime.batch_size = saved
    for index, (e, g) in enumerate(zip(expected, got)):
        if e.shape != g.shape:
            return (
                model,
                f"fixed batch {fixed}; a dynamic-batch copy changes output {index}'s shape; "
                f"run {fixed} at a time",
            )
        e64 = np.asarray(e, np.float64)
        scale = max(float(np.linalg.norm(e64)), 1e-30)
        difference = float(np.linalg.norm(e64 - np.asarray(g, np.float64))) / scale
        if difference > SAME_OUTPUTS_RTOL:
            return model, (
                f"fixed batch {fixed}; a dynamic-batch copy differs (relative L2 {difference:.1e}); "
                f"run {fixed} at a time"
            )
    return copy, f"fixed batch {fixed}: run in batches through a dynamic-batch copy (outputs identical)"
