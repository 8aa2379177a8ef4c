"""Sequential output correction (Zhang et al.): compress layers in graph order and refit each
layer's last factor by least squares, so that fed with the activations of the already-compressed
upstream model it reproduces the original model's output of that layer:

    M, b = argmin ‖T − H·M − 1·bᵀ‖,   T: original layer output on original inputs,
                                       H: the layer's hidden activations in the compressed model.

Closed form from the accumulated Gram matrices; no gradients. Upstream errors are absorbed by the
layers after them, which is why it recovers much of what truncation loses. A `Corrector` is a
refiner (tnopt/refine.py): `corrector(plan) -> plan`.
"""

from __future__ import annotations

import functools

import numpy as np

from tnopt.data import as_feeds
from tnopt.errors import InternalError
from tnopt.graph import emitted_tensor, upstream_layers
from tnopt.passes import METHODS, Factors
from tnopt.passes._linalg import refit_last_factor
from tnopt.plan import Choice, Plan
from tnopt.refit_equations import MIN_REFIT_SAMPLES, InputSpaceEquations, NormalEquations

# A refit needs this many rows (positions × samples) per unknown of each output column. Least
# squares on n rows and p unknowns fits its own rows with error (1 − p/n)σ² but new rows with
# (1 + p/n)σ²: the calibration data flatters it 3x at 2 rows per unknown (the old rule, under which
# MiniLM's refits on 32 sentences certified a 1% cosine drop that 32 other sentences saw as 33%),
# 1.3x at 8.
MIN_ROWS_PER_UNKNOWN = 8
# The targets (original layer outputs on the refit's samples) are kept in memory up to this size and
# reused by every refit; above it they are recomputed batch by batch beside each refit pass, so
# memory stays at one batch (one more original-model pass per refit wave instead). Per Corrector,
# and a budgeted run has two (the gate's cross-fitted one and the saved plan's): at 1 GiB each they
# held 2 GiB of ResNet-50's 42 MB-per-sample targets (24 of a pass's ≥ 128 samples each, the rest
# recomputed anyway); 512 MiB still holds the reference models' 512 samples whole (ResNet-style:
# 430 MB). Targets that do not fit whole are not held at all (`Corrector._fits_whole`).
MAX_HELD_TARGET_BYTES = 512 * 2**20
# Refit waves per plan. Each wave is one capture pass (and, when the targets are not held, one
# original-model pass); a chain of L rewritten layers corrected one after the other needs L waves,
# so above this many the layers are grouped in graph order and each group is refitted from one
# capture with the groups before it already corrected (within a group: from the uncorrected
# upstream, a Jacobi step). Keeps a verified plan's cost independent of how many layers it rewrites.
MAX_CORRECTION_WAVES = 4
# Cross-fitted refits: True, one capture per wave serves every fold (each fold's samples under its
# own upstream refits; fold k solves with the other folds' moments); False, each fold's chain runs
# the other folds' samples (exact cross-fitting, `folds` passes per wave).
SHARED_FOLD_CAPTURE = True
# The exact correction (sequential waves, exact cross-fitting, every refit sample) costs per
# verified plan about levels × folds passes over the refit samples (levels: the longest chain of
# candidate layers). Above this many FLOPs of that work the correction economises (`economy`):
# at most MAX_CORRECTION_WAVES waves, one shared capture per wave, passes that stop once rows
# suffice. Measured on VGG at 1% without the latency guard (512 samples): exact 2.95x FLOPs; one
# capture per wave under the all-sample upstream refits, 2.04x sequential, 1.90x at 4 waves, 1.79x
# at 2, 1.60x at 1 — so the reference models (VGG 1.1e12, ResNet-style 4.6e12) keep the exact
# correction, and ResNet-50 at 224² (~1e15), MiniLM or an 8-block residual net on 256 samples
# (5.6e12) economise.
ECONOMY_ABOVE_FLOPS = 5e12


def correction_mode(runner, layers, samples: int, folds: int) -> dict:
    """The Corrector's options for this model and data: exact, or the economy above (and why)."""
    names = [layer.name for layer in layers]
    upstream = upstream_layers(runner.original, names) if names else {}
    level = chain_levels(names, upstream)
    levels = 1 + max(level.values()) if level else 0
    per_pass = sum(max(int(layer.flops), 0) for layer in layers) * samples
    projected = float(levels) * max(folds, 1) * per_pass
    if projected > ECONOMY_ABOVE_FLOPS:
        return {"max_waves": MAX_CORRECTION_WAVES, "shared_capture": True, "early_stop": True}
    return {"max_waves": None, "shared_capture": False, "early_stop": False}


def chain_levels(names: list[str], upstream: dict[str, set[str]]) -> dict[str, int]:
    """Each of `names` (in graph order) → its depth in the chain of `names` alone: 0 with none of
    them upstream, else one more than the deepest of them upstream of it."""
    level: dict[str, int] = {}
    for name in names:  # graph order: upstream layers come first
        above = [level[u] for u in upstream.get(name, ()) if u in level]
        level[name] = 1 + max(above) if above else 0
    return level


class Corrector:
    """Refits plans against one fixed set of calibration inputs.

    The original model's layer outputs (the targets) do not depend on the plan: they are computed
    beside the first capture and kept while they fit in `max_held_bytes`, then reused by every plan
    the search verifies. Each layer's hidden activations come from the runner, in at most `max_waves`
    waves (one run, every layer of the wave refitted from it): on its board where that runs the
    plan, else from the compressed model cut just after them (an export and a session per wave).

    With `folds` > 1 (`fold_of_sample`: each input sample's fold, the folds in contiguous blocks)
    `cross_fitted(plan)` also gives, per fold, the plan refitted without that fold's samples, from
    the same capture passes (moment subtraction, `NormalEquations.without`): a wave runs each
    fold's samples under that fold's own chain of upstream refits (fitted without them), so every
    refit learns to absorb the upstream errors that samples its upstream did not see carry, the
    errors the gate (and new data) will meet. What is still fitted on fold k's samples in fold k's
    refit of a layer: the upstream refits that shaped the other folds' H saw fold k's targets of
    those upstream layers (never this layer's targets, never fold k's H). The plan refitted on all
    samples solves with every fold's moments."""

    def __init__(
        self,
        runner,
        layers,
        inputs: dict[str, np.ndarray],
        max_held_bytes: int = MAX_HELD_TARGET_BYTES,
        *,
        folds: int = 1,
        fold_of_sample=None,
        max_waves: int | None | str = "default",
        shared_capture: bool | str = "default",
        early_stop: bool = True,
    ):
        self.runner, self.inputs = runner, inputs
        self.max_held_bytes = max_held_bytes
        # None: sequential, one wave per level of rewritten layers (no bound).
        self.max_waves = MAX_CORRECTION_WAVES if max_waves == "default" else max_waves
        self.shared_capture = SHARED_FOLD_CAPTURE if shared_capture == "default" else shared_capture
        self.early_stop = early_stop
        self.folds = folds
        self.fold_of_sample = None if fold_of_sample is None else np.asarray(fold_of_sample)
        if self.fold_of_sample is not None and np.any(np.diff(self.fold_of_sample) < 0):
            raise InternalError("correction: the folds' samples must come in contiguous blocks")
        self.original, self.runtime, self.methods = runner.original, runner.runtime, runner.methods
        self.order = {layer.name: i for i, layer in enumerate(layers)}
        self.refittable = [
            layer
            for layer in layers
            if any(refit_spec(m, layer) is not None for m in self.methods.values() if layer.op in m.op_types)
        ]
        self.layer_names = [layer.name for layer in layers]
        self._held: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self._held_bytes = 0
        self._held_full = False
        # What the last calls cost: capture passes (waves) and the samples they ran.
        self.last_waves = 0
        self.last_samples = 0

    @functools.cached_property
    def upstream(self) -> dict[str, set[str]]:
        """Each layer's upstream layers; only the board's waves need them (a graph import)."""
        return upstream_layers(self.original, self.layer_names)

    @staticmethod
    def hidden_tensors(choices, methods=None) -> list[str]:
        """The tensors a board must expose for these (layer, method) paths to be refitted."""
        names = []
        for choice in choices:
            spec = refit_spec((methods or METHODS)[choice.method], choice.layer)
            if spec is not None:
                names.append(emitted_tensor(choice.layer.name, choice.method, spec.hidden_role))
        return names

    @functools.cached_property
    def _target_names(self) -> list[str]:
        return sorted({layer.output_name for layer in self.refittable})

    def target_batches(self, end: int | None = None):
        """A function rows → {output name: target rows}, called once per refit batch in order (a
        pass may stop early): held batches reused, the others computed by the original model beside
        the refit, one batch at a time, and kept while the held ones stay under `max_held_bytes`
        (none where a pass's samples do not fit whole, `_fits_whole`).
        `end`: the capture's last sample (+1), so that the batches fall where the capture's do."""
        names = self._target_names
        if not names:
            return lambda rows: {}
        state = {"stream": None, "next": None, "origin": 0}

        def at(rows):
            key = (rows.start, rows.stop)
            if key in self._held:
                return self._held[key]
            if state["stream"] is None or state["next"] != rows.start:
                state["stream"] = self.runtime.iter_batches(
                    self.runtime.with_outputs(self.original, names),
                    as_feeds(self.inputs).take(slice(rows.start, end)),
                    names,
                )
                state["origin"] = rows.start
            got, values = next(state["stream"])
            got = slice(got.start + state["origin"], got.stop + state["origin"])
            if (got.start, got.stop) != key:
                raise InternalError(f"correction: target batch {got} does not match hidden batch {rows}")
            state["next"] = rows.stop
            batch = dict(zip(names, values))
            size = sum(v.nbytes for v in values)
            if not self._held and not self._held_full and not self._fits_whole(size, got.stop - got.start):
                self._held_full = True  # a held prefix would spare a sliver of each pass, at the cap's bytes
            if not self._held_full and self._held_bytes + size <= self.max_held_bytes:
                self._held[key], self._held_bytes = batch, self._held_bytes + size
            else:
                self._held_full = True  # later batches are recomputed; the held prefix stays
            return batch

        return at

    def _fits_whole(self, batch_bytes: int, batch_samples: int) -> bool:
        """Whether the targets of every sample a capture pass reads at least (all of them, or
        MIN_REFIT_SAMPLES where passes stop early) fit in `max_held_bytes`. Where they do not, none
        are held: each pass recomputes the samples past the held prefix anyway, so the prefix saved a
        fraction of one original-model pass per wave (ResNet-50 at 224²: ~12 of ≥ 128 samples, 42 MB
        of targets each) for up to `max_held_bytes` per Corrector (two in a budgeted run) held
        through the search."""
        samples = as_feeds(self.inputs).samples()
        read = min(samples, MIN_REFIT_SAMPLES) if self.early_stop else samples
        return batch_bytes / max(batch_samples, 1) * read <= self.max_held_bytes

    def __call__(self, plan) -> Plan:
        return self.cross_fitted(plan)[0]

    def cross_fitted(self, plan, bases_by_fold: list[Plan] | None = None) -> tuple[Plan, list[Plan]]:
        """(the plan refitted on all samples, [the plan refitted without fold k's samples] per fold;
        [] without folds). `bases_by_fold`: fold k's refits start from that plan's factors (the same
        layers, methods and ranks: factors whitened without fold k, tnopt/fold_stats.py) instead of
        `plan`'s; in a shared capture only where `refits_fold_factors` allows."""
        ordered = sorted(plan, key=lambda c: self.order[c.layer.name])
        bases = None
        if bases_by_fold is not None and self._fold_count > 1:
            bases = [{c.layer.name: c for c in base} for base in bases_by_fold]
        self.last_waves = self.last_samples = 0
        corrected = None
        if self.runner.expresses(ordered, self._capture_names(ordered, bases)):
            corrected = self._in_waves(ordered, board=True, bases=bases)
        if corrected is None:
            corrected = self._in_waves(ordered, board=False, bases=bases)
        everything, by_fold = corrected
        return Plan(tuple(everything)), [Plan(tuple(choices)) for choices in by_fold]

    def refits_fold_factors(self, choice: Choice) -> bool:
        """Whether fold plans may carry their own factors for `choice` (cross-fitted whitening):
        always where each fold's chain is captured on its own (exact cross-fitting) or the layer is
        not refitted; in a shared capture only where the refit can rebuild H from the layer's input
        (`Method.input_map`) and that input is an intermediate tensor the capture can read."""
        method = self.methods[choice.method]
        if self._fold_count == 1 or not self.shared_capture or refit_spec(method, choice.layer) is None:
            return True
        return self._input_space(choice)

    def _input_space(self, choice: Choice) -> bool:
        method = self.methods[choice.method]
        return (
            refit_spec(method, choice.layer) is not None
            and method.input_map(choice.layer, choice.factors) is not None
            and choice.layer.input_name not in self._graph_inputs
        )

    @functools.cached_property
    def _graph_inputs(self) -> set[str]:
        return {value.name for value in self.original.graph.input}

    def input_space_tensors(self, choices) -> list[str]:
        """The layer inputs a shared capture reads to refit fold factors of these choices."""
        if self._fold_count == 1 or not self.shared_capture:
            return []
        return sorted({c.layer.input_name for c in choices if self._input_space(c)})

    def _in_space(self, wave, bases) -> set[str]:
        """The wave's layers refitted from their input (shared capture, folds with own factors)."""
        if bases is None or not self.shared_capture:
            return set()
        return {
            c.layer.name
            for c in wave
            if self._input_space(c) and any(base[c.layer.name] is not c for base in bases)
        }

    def _capture_names(self, choices, bases, in_space=None) -> list[str]:
        """What a capture of `choices` reads: each refit's hidden tensor, or its layer's input
        where it is refitted in input space."""
        in_space = self._in_space(choices, bases) if in_space is None else in_space
        names = []
        for choice in choices:
            if choice.layer.name in in_space:
                names.append(choice.layer.input_name)
            else:
                names.extend(self.hidden_tensors([choice], self.methods))
        return list(dict.fromkeys(names))

    def waves(self, ordered: list[Choice]) -> list[list[Choice]]:
        """The plan's refittable choices in waves: sequential (a layer after every rewritten layer
        upstream of it) up to `max_waves`; beyond, consecutive levels merged into that many groups."""
        refits = [c for c in ordered if refit_spec(self.methods[c.method], c.layer) is not None]
        level = chain_levels([c.layer.name for c in refits], self.upstream)
        levels = 1 + max(level.values()) if level else 0
        groups = levels if self.max_waves is None else min(levels, self.max_waves)
        waves: list[list[Choice]] = [[] for _ in range(groups)]
        for choice in refits:
            waves[level[choice.layer.name] * groups // levels].append(choice)
        return [wave for wave in waves if wave]

    def _in_waves(self, ordered: list[Choice], board: bool, bases=None):
        """Refit wave by wave: one run of the plan (corrected so far + the rest as they are) gives
        every layer of the wave its H: on the board, or exported and cut just after the wave's H
        (an export and a session per wave). With folds, `shared_capture`: each fold's samples run
        under that fold's refits (one pass in all); else each fold's chain runs every other fold's
        samples and the plan refitted on all runs all of them (folds passes per wave). `bases`:
        per fold, layer → the choice its chain starts from (default: `ordered`'s). None: the
        board cannot run a wave's plan."""
        done: dict[str, Choice] = {}
        folds = self._fold_count
        done_by_fold: list[dict[str, Choice]] = [{} for _ in range(folds)]
        base_of = [ordered] * folds if bases is None else [[b[c.layer.name] for c in ordered] for b in bases]
        everything = slice(0, _samples(self.inputs))
        for wave in self.waves(ordered):
            specs = {c.layer.name: refit_spec(self.methods[c.method], c.layer) for c in wave}
            in_space = self._in_space(wave, bases)
            names = self._capture_names(wave, bases, in_space)
            self.last_waves += 1

            def new_equations():
                return {c.layer.name: NormalEquations(specs[c.layer.name], folds) for c in wave}

            shared = new_equations()
            for choice in wave:
                if choice.layer.name in in_space:
                    method = self.methods[choice.method]
                    shared[choice.layer.name] = InputSpaceEquations(
                        specs[choice.layer.name],
                        folds,
                        method.input_map(choice.layer, choice.factors),
                        [method.input_map(b.layer, b.factors) for b in (x[choice.layer.name] for x in bases)],
                    )
            if folds == 1:
                runs = [(done, ordered, everything, None, shared)]
            elif self.shared_capture:
                runs = [(done_by_fold[f], base_of[f], self._fold_rows(f), f, shared) for f in range(folds)]
            else:
                per_chain = [new_equations() for _ in range(folds)]
                runs = [(done, ordered, self._fold_rows(j), j, shared) for j in range(folds)] + [
                    (done_by_fold[k], base_of[k], self._fold_rows(j), j, per_chain[k])
                    for k in range(folds)
                    for j in range(folds)
                    if j != k
                ]
            for chain, base, rows, fold, equations in runs:
                plan = [chain.get(c.layer.name, c) for c in base]
                if board and not self.runner.expresses(plan, names):
                    return None
                if rows.stop <= rows.start:
                    continue
                if len(runs) > 1:
                    # The folds' chains differ in factor values only: one session for the wave.
                    self.runner.lift(plan, names, board=board)
                inputs = as_feeds(self.inputs).take(rows) if fold is not None else self.inputs
                batches = self.runner.capture(plan, names, inputs, board=board)
                self._accumulate(batches, wave, equations, rows, fold, in_space)
            position = {c.layer.name: i for i, c in enumerate(ordered)}
            for choice in wave:
                name = choice.layer.name
                fold_bases = [b[position[name]] for b in base_of]
                self._solve_all(
                    choice, shared[name], done, done_by_fold if self.shared_capture else [], fold_bases
                )
                if folds > 1 and not self.shared_capture:
                    for k in range(folds):
                        equations = per_chain[k][name]
                        done_by_fold[k][name] = self._solve(
                            fold_bases[k], equations, equations.gram, equations.cross, equations.rows
                        )
        by_fold = [[fold.get(c.layer.name, c) for c in base] for fold, base in zip(done_by_fold, base_of)]
        return [done.get(c.layer.name, c) for c in ordered], by_fold if self.folds > 1 else []

    def _fold_rows(self, fold: int) -> slice:
        where = np.flatnonzero(self.fold_of_sample == fold)
        return slice(int(where[0]), int(where[-1]) + 1) if len(where) else slice(0, 0)

    @property
    def _fold_count(self) -> int:
        return self.folds if self.folds > 1 and self.fold_of_sample is not None else 1

    def _accumulate(self, batches, choices, equations, span: slice, fold: int | None, in_space=()) -> None:
        """One capture pass over the samples `span` into the normal equations (of `fold`, or split
        by sample); it stops once every layer has enough rows. `in_space`: layers whose equations
        read the layer's input (`InputSpaceEquations`), not the hidden tensor."""
        targets_at = self.target_batches(span.stop)
        hidden_names = {c.layer.name: self.hidden_tensors([c], self.methods) for c in choices}
        for rows, captured in batches:
            rows = slice(rows.start + span.start, rows.stop + span.start)
            targets = targets_at(rows)
            folds = None if self._fold_count == 1 else self.fold_of_sample[rows]
            for choice in choices:
                if choice.layer.name in in_space:
                    equations[choice.layer.name].add(
                        captured[choice.layer.input_name], targets[choice.layer.output_name], folds
                    )
                    continue
                name = hidden_names[choice.layer.name][0]
                spec = equations[choice.layer.name].spec
                width = spec.to_matrix(choice.factors.arrays[spec.factor_key]).shape[0]
                # The board runs the widest rank; the padded channels of H are zeros.
                hidden = np.take(captured[name], np.arange(width), axis=spec.channel_axis)
                equations[choice.layer.name].add(hidden, targets[choice.layer.output_name], folds)
            self.last_samples += rows.stop - rows.start
            if self.early_stop and rows.stop < span.stop and all(e.enough(fold) for e in equations.values()):
                break

    def _solve_all(self, choice, equations, done, done_by_fold, fold_bases) -> None:
        everything = (equations.gram, equations.cross, equations.rows)
        done[choice.layer.name] = self._solve(choice, equations, *everything)
        if len(done_by_fold) > 1:
            for fold, fold_done in enumerate(done_by_fold):
                rest = equations.without(fold)
                base = fold_bases[fold]
                # Rows not told apart by sample: the fold is gated on the unrefitted layer (never on
                # a refit that saw it).
                fold_done[choice.layer.name] = base if rest is None else self._solve(base, equations, *rest)

    @staticmethod
    def _solve(choice: Choice, equations: NormalEquations, gram, cross, rows) -> Choice:
        spec = equations.spec
        if gram is None or MIN_ROWS_PER_UNKNOWN * len(gram) > rows:
            return choice  # too few rows per unknown: a refit would memorise the calibration set
        solution = refit_last_factor(gram, cross)
        arrays = dict(choice.factors.arrays)
        last = arrays[spec.factor_key]
        arrays[spec.factor_key] = spec.from_matrix(solution[:-1] if spec.intercept else solution, last)
        if spec.intercept:
            arrays["bias"] = solution[-1].astype(last.dtype)
        notes = dict(choice.factors.notes, corrected=True)
        return choice.with_factors(Factors(arrays, choice.factors.rank, choice.factors.rel_error, notes))


def refit_spec(method, layer):
    """`method`'s refit of `layer`, or None where the layer's bias is not a constant per-channel
    vector: the target holds that bias and the rewritten node adds it again (a Gemm C of shape
    (M, N)), or a refitted intercept would replace a bias the caller feeds at run time."""
    if layer.has_bias and layer.bias is None:
        return None
    return method.refit_spec(layer)


def _samples(inputs) -> int:
    return as_feeds(inputs).samples()
