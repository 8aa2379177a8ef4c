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

from tnopt.errors import InternalError, TnoptError

# onnxruntime logs provider-library load failures (no CUDA here) to stderr on its own; tnopt reports
# the provider it got itself, in one line, so only fatal runtime messages may pass.
ort.set_default_logger_severity(3)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def _quiet_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    # Fatal only: a failed load or run raises, and tnopt reports it in one line of its own; the
    # executor's own error log would add a second, unformatted line to stderr.
    options.log_severity_level = 4
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

    @property
    def provider_name(self) -> str:
        return "cuda" if self.providers[0] == CUDA else "cpu"

    def session(self, model: onnx.ModelProto | bytes, *, own: bool = False) -> ort.InferenceSession:
        """A session on `model`; `own`: tnopt built this graph, so a failure is an InternalError."""
        payload = model if isinstance(model, bytes) else model.SerializeToString()
        where = _rewrites(model) if own else ""
        try:
            session = ort.InferenceSession(payload, _quiet_options(), providers=self.providers)
        except Exception as exc:
            raise _failure(own, "cannot load", exc, where) from None
        session.tnopt_own, session.tnopt_where = own, where
        return session

    def verify_loads(self, payload: bytes) -> None:
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
        sample's activations at once. `feeds`: arrays (axis 0 = samples, cut into batches here) or
        an iterable of such dicts, one per batch (a stream; each is cut again where it is larger)."""
        session = (
            model_or_session
            if isinstance(model_or_session, ort.InferenceSession)
            else self.session(model_or_session)
        )
        own, where = getattr(session, "tnopt_own", False), getattr(session, "tnopt_where", "")
        fixed = None
        start = 0
        for chunk in [feeds] if isinstance(feeds, dict) else feeds:
            if fixed is None:
                fixed = fixed_batch(session, chunk) or 0
            step = fixed or self.batch_size
            n = len(next(iter(chunk.values())))
            for offset in range(0, n, step):
                batch = {k: v[offset : offset + step] for k, v in chunk.items()}
                short = len(next(iter(batch.values())))
                if short < step and fixed:
                    # A model with a fixed batch dim gets the last chunk padded, then trimmed.
                    batch = {
                        k: np.concatenate([v, np.repeat(v[-1:], step - short, axis=0)])
                        for k, v in batch.items()
                    }
                try:
                    outputs = session.run(output_names, {**batch, **(constants or {})})
                except Exception as exc:
                    raise _failure(own, "failed to run", exc, where) from None
                yield slice(start, start + short), [o[:short] for o in outputs]
                start += short

    def with_outputs(self, model: onnx.ModelProto, tensor_names: list[str]) -> ort.InferenceSession:
        """A session on a copy of `model` that also returns the named intermediate tensors."""
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        existing = {o.name for o in probe.graph.output}
        for name in tensor_names:
            if name not in existing:
                probe.graph.output.append(onnx.ValueInfoProto(name=name))
        return self.session(probe)

    def capture(self, model: onnx.ModelProto, tensor_names: list[str], feeds) -> dict[str, np.ndarray]:
        """Values of intermediate tensors on all of `feeds` (small inputs only: it keeps them all)."""
        values = self.run(self.with_outputs(model, tensor_names), feeds, output_names=list(tensor_names))
        return dict(zip(tensor_names, values))

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


def fixed_batch(session: ort.InferenceSession, feeds=None) -> int | None:
    """The static batch dim of the data inputs (those in `feeds`, all inputs when None), if any."""
    dims = [i.shape[0] for i in session.get_inputs() if i.shape and (feeds is None or i.name in feeds)]
    fixed = [d for d in dims if isinstance(d, int)]
    return fixed[0] if fixed else None
