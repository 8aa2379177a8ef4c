"""The plan runner: the one way tnopt runs a plan (search, correction, latency, refiners).

One `PlanRunner` is built per run, on the original model, the runtime and the run's method table:

    runner.prepare(widest, inputs, hidden)    build the switchboard for these (layer, method) paths,
                                              keep it only if a plan runs faster on it (timed once)
    runner.outputs(plan, inputs)              → (rows, [model outputs]) per batch
    runner.capture(plan, tensor_names, inputs) → (rows, {name: value}) per batch
    runner.run(plan, inputs)                  → the model outputs on all of `inputs` (concatenated)
    runner.export(plan)                       → the ModelProto with the plan spliced in
    runner.lift(plan, tensor_names)           the plan's structure runs (or is captured at those
                                              tensors) again with other factor values on one
                                              session: no re-export (the gate's folds, healing)

`inputs` are arrays (samples on axis 0) or an iterable of such dicts, one per batch; nothing here
holds more than one batch of activations. The runner alone decides how a plan runs: fed to the
board when it can express it, else on a lifted session of the same structure, else on a board that
was timed slower at the prepared sample count when this call has so few samples that an export's
fixed cost would dominate, else exported (a graph export and a session). Its graph surgery is
tnopt.splice's.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import onnx

from tnopt.data import as_feeds
from tnopt.graph import truncate
from tnopt.passes import METHODS
from tnopt.plan import Choice, Plan
from tnopt.splice import emitted_constants, isolate_layer, lift_factors, splice_plan
from tnopt.switchboard import Switchboard

# A board bigger than this is not built (protobuf's 2 GiB limit, and memory): plans are exported.
MAX_BOARD_BYTES = 1_500_000_000
# Lifted sessions kept at once, least recently used dropped first: each holds the model's weights,
# and their users (the gate's folds of one plan, one correction wave) need one or two at a time.
MAX_LIFTED_SESSIONS = 2
# Board or export is timed on at most this many of the prepared samples and extrapolated (an
# export's fixed cost plus a per-sample cost each way): timed on all of them it cost three passes
# (MiniLM, 96 sentences: 41 of a 291 s search under load; ResNet-50 at 512 crops: ~150 s).
TIMING_SAMPLES = 32


class PlanRunner:
    def __init__(self, original: onnx.ModelProto, runtime, methods=None):
        self.original, self.runtime = original, runtime
        self.methods = methods or METHODS
        self.output_names = [o.name for o in original.graph.output]
        self.board: Switchboard | None = None
        # A board that loses to an export at the prepared sample count but wins below `few_samples`
        # (the export's fixed cost, a graph export and a session, spread over fewer samples).
        self.few_board: Switchboard | None = None
        self.few_samples = 0.0
        self.prepared_samples = 0  # the sample count `prepare` chose the board for
        self.timings: dict[str, float] = {}  # seconds for one plan on the board and exported
        self.runs = {"switchboard": 0, "exported": 0}  # how plans ran
        # (structure, factor names, captured tensors) → (session, {input: (shape, dtype)})
        self._lifted: OrderedDict[tuple, tuple] = OrderedDict()

    # -- choosing how plans run -----------------------------------------------------------------------
    def prepare(self, widest, inputs, extra_outputs=()) -> None:
        """A board for `widest` (one Choice per (layer, method) at the widest rank, zero-paddable
        methods only), kept when a plan on all of `inputs` runs faster on it than exported (timed on
        TIMING_SAMPLES of them), or for runs on few samples only (`few_board`); `extra_outputs`:
        tensors that `capture` will read from it."""
        widest = list(widest)
        extra = sum(a.nbytes for c in widest for a in c.factors.arrays.values())
        self.board, self.timings, self.few_board, self.few_samples = None, {}, None, 0.0
        if not widest or self.original.ByteSize() + extra > MAX_BOARD_BYTES:
            return
        board = Switchboard(self.original, widest, self.runtime, extra_outputs, self.methods)
        samples = _samples(inputs) or 1
        timed = min(samples, TIMING_SAMPLES)
        if timed < samples:
            inputs = as_feeds(inputs).take(slice(0, timed))
        self.timings = time_plan_runs(board, self, widest[0], inputs)
        self.few_samples = board_wins_below(self.timings, timed)
        self.prepared_samples = samples
        if self.few_samples > samples:
            self.board = board
        elif self.few_samples > 1:
            board.release()  # reopened by the first run on few samples, if any comes
            self.few_board = board

    def expresses(self, plan, tensor_names=()) -> bool:
        """Whether the board runs `plan` (and exposes `tensor_names`) without an export."""
        return (
            self.board is not None
            and set(tensor_names) <= set(self.board.extra_outputs)
            and self.board.feed_for(Plan.of(plan)) is not None
        )

    def lift(self, plan, tensor_names=(), *, board: bool = True) -> None:
        """Export `plan` once with its factors as graph inputs (cut after `tensor_names` when given,
        for `capture`): from now on every plan of the same structure (layer, method, rank and factor
        names per choice) runs, or is captured at those tensors, on that session with its own factor
        values. Nothing to do where the board runs the plan (`board`: the caller uses it). At most
        MAX_LIFTED_SESSIONS are kept.
        Worth it where several plans of one structure run in a row: the cross-fitted gate's folds
        (MiniLM: an export and a session cost ~1.3 s, running a fold's 24 sentences ~0.6 s)."""
        plan, names = Plan.of(plan), tuple(tensor_names)
        key = _lift_key(plan, names)
        if not len(plan) or (board and self.expresses(plan, names)):
            return
        if key in self._lifted:
            self._lifted.move_to_end(key)
            return
        model, inputs = lift_factors(self.original, plan, self.methods)
        if names:
            model = truncate(model, list(names))
        self._lifted[key] = (self.runtime.session(model, own=True), inputs)
        while len(self._lifted) > MAX_LIFTED_SESSIONS:
            self._lifted.popitem(last=False)

    def release(self) -> None:
        """Close every session the runner keeps (lifted plans, the boards'): the search is over, and
        what follows (export, validation, latency) opens its own. A later run reopens them."""
        self._lifted.clear()
        for board in (self.board, self.few_board):
            if board is not None:
                board.release()

    # -- running ----------------------------------------------------------------------------------------
    def export(self, plan) -> onnx.ModelProto:
        """The original model with `plan` spliced in (a copy of it for an empty plan)."""
        plan = Plan.of(plan)
        if not len(plan):
            copy = onnx.ModelProto()
            copy.CopyFrom(self.original)
            return copy
        return splice_plan(self.original, plan, self.methods)

    def outputs(self, plan, inputs):
        """(rows, [model outputs]) per batch of `inputs` under `plan`."""
        plan = Plan.of(plan)
        if self.board is not None:
            batches = self.board.iter_outputs(plan, self.output_names, inputs)
            if batches is not None:
                self.runs["switchboard"] += 1
                return batches
        lifted = self._lifted_feed(plan)
        if lifted is not None:
            self.runs["exported"] += 1
            session, feed = lifted
            return self.runtime.iter_batches(session, inputs, self.output_names, constants=feed)
        if self.few_board is not None and (_samples(inputs) or self.few_samples) < self.few_samples:
            batches = self.few_board.iter_outputs(plan, self.output_names, inputs)
            if batches is not None:
                self.runs["switchboard"] += 1
                return batches
        self.runs["exported"] += 1
        return self.runtime.iter_batches(self.session(plan), inputs, self.output_names)

    def run(self, plan, inputs) -> list[np.ndarray]:
        """The model outputs under `plan` on all of `inputs`, concatenated over batches."""
        return _concatenated(self.outputs(plan, inputs))

    def run_exported(self, plan, inputs) -> list[np.ndarray]:
        """As `run`, always on the exported graph (what the user gets saved)."""
        return _concatenated(self.runtime.iter_batches(self.session(plan), inputs, self.output_names))

    def capture(self, plan, tensor_names, inputs, *, board: bool = True):
        """(rows, {name: value}) per batch: intermediate tensors of the model under `plan`. Off the
        board (or with `board=False`), the exported model is cut just after them (onnxruntime runs
        every node otherwise)."""
        plan, names = Plan.of(plan), list(tensor_names)
        if board and self.board is not None and set(names) <= set(self.board.extra_outputs):
            batches = self.board.iter_capture(plan, names, inputs)
            if batches is not None:
                return batches
        lifted = self._lifted_feed(plan, names)
        if lifted is not None:
            session, feed = lifted
            batches = self.runtime.iter_batches(session, inputs, constants=feed)
        else:
            head = self.runtime.session(truncate(self.export(plan), names), own=True)
            batches = self.runtime.iter_batches(head, inputs)
        return ((rows, dict(zip(names, values))) for rows, values in batches)

    def isolated(self, layer, input_shape, plan=()) -> onnx.ModelProto:
        """`layer` alone on an input of `input_shape`, dense or with `plan` (its choice for this
        layer) spliced in: what the latency guard times."""
        dense = isolate_layer(layer, self.original, input_shape, layer.weight.dtype)
        return splice_plan(dense, Plan.of(plan), self.methods) if len(Plan.of(plan)) else dense

    def session(self, plan):
        return self.runtime.session(self.export(plan), own=True)

    def _lifted_feed(self, plan: Plan, tensor_names=()):
        entry = self._lifted.get(_lift_key(plan, tuple(tensor_names)))
        if entry is None:
            return None
        session, inputs = entry
        feed = {}
        for choice in plan:
            emitted = emitted_constants(choice.layer, self.methods[choice.method], choice.factors)
            feed.update({k: np.ascontiguousarray(v) for k, v in emitted.items() if k in inputs})
        if set(feed) != set(inputs) or any(feed[k].shape != tuple(inputs[k][0]) for k in feed):
            return None  # another structure after all (e.g. a refitted bias the lifted graph lacks)
        return session, feed


def _lift_key(plan: Plan, tensor_names: tuple) -> tuple:
    # A refit adds factors (an intercept): the same ranks with a bias input are another graph.
    return plan.structure, tuple(tuple(sorted(c.factors.arrays)) for c in plan), tensor_names


def time_plan_runs(board: Switchboard, runner: PlanRunner, choice: Choice, inputs) -> dict[str, float]:
    """Seconds for one plan both ways on `inputs`. The board computes every layer's dense node and
    widest paths on each run, so it only pays where an export and a session cost more than that
    extra work: big models on little data (MiniLM on 32 sentences: 0.71 s against 1.20 s), not a
    small conv net on 512 images (ResNet-style: 1.72 s against 0.64 s)."""
    # Opens its session and sizes its arena: one batch does it (the timed run below repeats that
    # batch's shapes); a warm-up on every timed sample cost ResNet-50 a 32-crop run (~5 s quiet).
    warm = as_feeds(inputs).take(slice(0, runner.runtime.batch_size)) if isinstance(inputs, dict) else inputs
    board.run([], warm)
    start = time.perf_counter()
    board.run([choice], inputs)
    on_board = time.perf_counter() - start
    start = time.perf_counter()
    session = runner.session([choice])
    fixed = time.perf_counter() - start
    _concatenated(runner.runtime.iter_batches(session, inputs, runner.output_names))
    return {"switchboard": on_board, "exported": time.perf_counter() - start, "export_fixed": fixed}


def board_wins_below(timings: dict, samples: int) -> float:
    """The sample count below which one plan runs faster on the board than exported, from
    `time_plan_runs` on `samples` samples: the board costs more per sample (it computes every
    layer's dense node and widest paths), the export a fixed graph export and session. MiniLM, 96
    sentences: board 5.9 s, exported 4.5 s of which ~1.3 s fixed: the board wins below ~40, e.g. on
    the predicted sweep's 10-sentence subsample."""
    per_sample_board = timings["switchboard"] / samples
    per_sample_exported = (timings["exported"] - timings.get("export_fixed", 0.0)) / samples
    if per_sample_board <= per_sample_exported:
        return float("inf")
    return timings.get("export_fixed", 0.0) / (per_sample_board - per_sample_exported)


def _samples(inputs) -> int | None:
    """Samples in `inputs` (None for a stream of batches)."""
    if isinstance(inputs, dict):
        return as_feeds(inputs).samples()
    return None


def _concatenated(batches) -> list[np.ndarray]:
    chunks = [outputs for _, outputs in batches]
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]


def apply_plan(model: onnx.ModelProto, choices, methods=None) -> tuple[onnx.ModelProto, bool]:
    """(`model` with `choices` spliced in, whether anything changed): the export, without a runner."""
    return PlanRunner(model, None, methods).export(choices), bool(len(Plan.of(choices)))
