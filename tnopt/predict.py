"""Search stage 2, predicted: each candidate's sensitivity from its local error, calibrated per layer by
a few whole-model runs on a small subsample (instead of one whole-model run per (layer, method, rank)).

    predicted_sweep(ctx, layers, candidates, decisions) → ({(layer, method, rank): entry}, cache hits)

An entry is the measured sweep's {"drop", "proxy", "weight_error"} (+ "refused") plus "local_error"
and "predicted" (True: from the map below, False: measured on the subsample). The map:

    proxy(e) = p_n · (e / e_n)^s          e: the candidate's local error (tnopt.local_error, no ORT run)
    drop(e)  = proxy(e) · max_i(drop_i / proxy_i)   over the layer's measured points

between two measured points of the same (layer, method) a log-log interpolation; outside them (e_n,
p_n) is the nearest one and s the median log-log slope over every (layer, method) with two measured
points (1, first order, before any), taken ≥ 1 upward and ≤ 1 downward (_predict says why).
Measured points: one anchor per (layer, method) (the rank whose e is nearest ANCHOR_ERROR),
then up to FRONTIER_ROUNDS rounds of one point per layer where the allocations near the budget's
frontier (the largest τ of the verification grid whose predicted plan, run unrefined on the subsample,
stays within the budget, and the next τ) pick an option far in e from the layer's measured points or of
a method not measured there.

Local errors, the screen and the latency guard read each candidate's estimate (tnopt.passes
Method.estimate: the truncated HOSVD for Tucker-2, whose two mode SVDs serve every rank), not its fit:
only the ranks that run on data (the measured points, the frontier plans, verified plans) are fitted,
so a layer costs two SVDs plus a few fits instead of a HOOI per rank. A measured point's e is its
estimate's too, so the map goes from the estimate's e to the fitted factors' proxy throughout.

Measurements run on at most SUBSAMPLE samples chosen by stratifying the calibration set along the first
principal direction of the original model's outputs (the direction along which they vary most), fewer
when the layers are many (ANCHOR_PASSES). Plans are still verified on every calibration sample
(tnopt/verify.py): the predictor only saves sweep work. Layers without moments (a left-weight MatMul)
fall back to the measured sweep.
"""

from __future__ import annotations

import math

import numpy as np

from tnopt import budget as B
from tnopt.local_error import dense_weight, local_error, output_energy, predictable
from tnopt.metric_choice import smooth_proxy
from tnopt.passes import Refusal
from tnopt.plan import Choice
from tnopt.threads import math_threads

SUBSAMPLE = 64
# The subsample's floor. A count metric (top-1, agreement) moves in steps of 1/n on n samples, so
# its drop needs a few dozen; a continuous one (cosine, relative L2, task scores) is read on a
# handful. Above the floor the anchors cost a fixed ANCHOR_PASSES whole-model passes, i.e. the
# same work per candidate layer at any depth (at 16 samples a 64-block net paid 8x more per layer
# than an 8-block one).
MIN_SUBSAMPLE = 16
MIN_SMOOTH_SUBSAMPLE = 4
COUNT_METRICS = ("top1", "agreement")
# The anchors together cost about this many whole-model passes over the calibration set (each anchor
# runs the subsample once), so a deep model gets a smaller subsample rather than more passes.
ANCHOR_PASSES = 4.0
# The local error the anchor rank sits nearest: clearly measurable, yet in the range budgets use.
ANCHOR_ERROR = 0.02
# A chosen option more than this factor away in e from every measured point of its layer is measured.
FRONTIER_FACTOR = 4.0
SLOPE_RANGE = (0.75, 2.0)
# Frontier rounds after the anchors, each at most one more measurement per layer.
FRONTIER_ROUNDS = 2
# A method's ranks are predicted from high to low until the layer's own output is this far off
# (relative error ~70%): lower ranks only lose more, the measured sweep's stop rule in local terms.
LOCAL_STOP_ERROR = 0.5
# Proxies below this are taken as this (a measured zero would make every rank of the layer free).
PROXY_FLOOR = 1e-12


# --sensitivity auto: the measured sweep where its projected ORT work is at most this many FLOPs
# (every candidate (layer, method, rank) of the two screened methods once on the sweep samples, at
# the model's FLOPs per sample): ~6 minutes at the ~80 GFLOP/s onnxruntime reaches on 2 cores, an
# upper bound (its ranks stop at SWEEP_STOP_DROP). The reference models (VGG 2.4e12, ResNet-style
# 1.1e13 at 512 samples) stay measured, where it was benchmarked against the prediction; ResNet-50
# at 224x224 (4e15) or a 64-block net is predicted. FLOPs, not a timing: the same command makes
# the same choice on a loaded machine.
AUTO_MEASURED_MAX_FLOPS = 3e13
# What a sample costs beyond its FLOPs: onnxruntime also moves every activation through memory, and
# a net of depthwise convs at high resolution is bound by that. Each activation byte counts as this
# many FLOPs (the CPU's FLOP rate over its activation bandwidth, fitted on 2 cores: VGG/ResNet-style
# and a 16-block conv net ran 33-41 GFLOP/s with 0.4-0.7 GB/s of activations, PP-OCR det-tiny at
# 736x736 11 GFLOP/s with 3.0 GB/s; t ≈ FLOPs/40e9 + bytes/4e9 fits all five within 15%). It adds
# ~13% to the reference models and 3.7x to det-tiny, whose FLOPs alone said 0.3 of its time.
FLOPS_PER_ACTIVATION_BYTE = 10.0


def choose_sensitivity(
    layers, candidates, methods, samples: int, sample_activation_bytes: int = 0
) -> tuple[str, str]:
    """("measured" | "predicted", why) for --sensitivity auto, from the projected work of the
    measured sweep (module constant AUTO_MEASURED_MAX_FLOPS): its FLOPs plus the memory traffic of
    `sample_activation_bytes` per sample, in FLOP equivalents (FLOPS_PER_ACTIVATION_BYTE)."""
    from tnopt.sweep import MAX_SWEEP_SAMPLES

    per_sample = sum(max(int(layer.flops), 0) for layer in layers)
    per_sample += FLOPS_PER_ACTIVATION_BYTE * max(int(sample_activation_bytes), 0)
    entries = 0
    for layer in layers:
        counts = sorted(
            (len(methods[m].candidate_ranks(layer)) for m in candidates.get(layer.name, ()) if m in methods),
            reverse=True,
        )
        entries += sum(counts[:2])  # the screen keeps two methods per layer
    projected = float(entries) * min(samples, MAX_SWEEP_SAMPLES) * per_sample
    words = f"measured sweep projected at {projected:.1e} FLOP-equivalents ({entries} candidates)"
    if projected <= AUTO_MEASURED_MAX_FLOPS:
        return "measured", f"auto: {words} <= {AUTO_MEASURED_MAX_FLOPS:.0e}"
    return "predicted", f"auto: {words} > {AUTO_MEASURED_MAX_FLOPS:.0e}"


def subsample_indices(reference: list[np.ndarray], n: int) -> np.ndarray:
    """n of the calibration samples, stratified along the first principal direction of the reference
    outputs: sorted by their score on it, one sample from each of n equal strata (its middle)."""
    total = len(reference[0])
    if n >= total:
        return np.arange(total)
    flat = np.concatenate([np.asarray(r, dtype=np.float32).reshape(total, -1) for r in reference], axis=1)
    flat = flat - flat.mean(axis=0)
    gram = (flat @ flat.T).astype(np.float64)  # (total, total): cheap whatever the output size
    _, vectors = np.linalg.eigh(gram)
    order = np.argsort(vectors[:, -1], kind="stable")
    picks = ((np.arange(n) + 0.5) * total / n).astype(int)
    return np.sort(order[picks])


class _Subsample:
    def __init__(self, ctx, n: int):
        self.indices = subsample_indices(ctx.reference, n)
        self.data = ctx.calib.subset(self.indices, f"{ctx.calib.source}[stratified {len(self.indices)}]")
        self.reference = [r[self.indices] for r in ctx.reference]
        self.baseline = ctx.metric(self.reference, self.reference, self.data.labels)
        self.plans = 0

    def plan_drop(self, ctx, choices) -> float:
        """The metric's drop on the subsample under an (unrefined) plan."""
        self.plans += 1
        outputs = ctx.runner.run(choices, self.data.inputs)
        return ctx.drop_of(ctx.metric(self.reference, outputs, self.data.labels), self.baseline)

    def measure(self, ctx, layer, method, rank, factors) -> dict:
        key = f"sub{len(self.indices)}|{layer.name}|{method}|{ctx.methods[method].rank_label(rank)}"
        entry = ctx.cache.get(key)
        if entry is None:
            outputs = ctx.runner.run([Choice(layer, method, factors)], self.data.inputs)
            value = ctx.metric(self.reference, outputs, self.data.labels)
            entry = {
                "drop": ctx.drop_of(value, self.baseline),
                "proxy": smooth_proxy(ctx.metric, self.reference, outputs),
            }
            ctx.cache.put(key, entry)
        return dict(entry)


def predicted_sweep(ctx, layers, candidates, decisions) -> tuple[dict, int]:
    from tnopt.sweep import sweep

    stats = getattr(ctx, "stats", None) or {}
    fits_before, estimates_before = ctx.fits, ctx.estimates
    able = [layer for layer in layers if predictable(layer, stats.get(layer.name))]
    rest = [layer for layer in layers if layer not in able]
    measured: dict[tuple, dict] = {}
    hits = 0
    if rest:
        measured, hits = sweep(ctx, rest, candidates, decisions)
    if not able:
        return measured, hits
    # Local errors of every candidate: math only.
    local: dict[tuple, float] = {}
    weight_errors: dict[tuple, float] = {}
    bar = ctx.bar(
        sum(len(ctx.methods[m].candidate_ranks(a)) for a in able for m in candidates[a.name]), "predict"
    )
    out_of_time = getattr(ctx, "out_of_time", lambda: False)
    for layer in able:
        if out_of_time():
            break  # --time-limit: layers not reached get no options (ResNet-50 ran 4 min past 120 s here)
        # The (O, d)·(d, d) products: every core where the machine is idle and the layer is large.
        with math_threads(int(getattr(layer.weight, "size", 0) or 0)):
            _local_errors(ctx, layer, stats[layer.name], candidates, local, weight_errors, measured, bar)
    bar.close()
    pairs = sorted({(k[0], k[1]) for k in local})
    floor = MIN_SUBSAMPLE if getattr(ctx.metric, "name", "") in COUNT_METRICS else MIN_SMOOTH_SUBSAMPLE
    size = int(min(SUBSAMPLE, max(floor, ANCHOR_PASSES * len(ctx.calib) / max(len(pairs), 1))))
    sub = _Subsample(ctx, size)
    points: dict[str, dict[tuple, dict]] = {layer.name: {} for layer in able}  # layer → key → entry

    def measure(key):
        layer = next(a for a in able if a.name == key[0])
        entry = sub.measure(ctx, layer, key[1], key[2], ctx.factors_for(layer, key[1], key[2]))
        entry["local_error"] = local[key]
        points[key[0]][key] = entry

    # Round 1: one anchor per (layer, method): methods differ in how much of their local error the
    # rest of the network passes on (measured: 100x between SVD and MPO on one VGG Gemm).
    for name, method in pairs:
        if out_of_time():
            break
        pool = [k for k in local if k[0] == name and k[1] == method]
        measure(min(pool, key=lambda k: abs(math.log(max(local[k], 1e-12) / ANCHOR_ERROR))))
    # Rounds 2..: the frontier. The predicted plans of the τ grid run (unrefined) on the subsample;
    # around the largest τ whose plan stays within the budget, each layer's chosen option that is far
    # from its measured points (or of a method not measured there) is measured, and the map refitted.
    by_name = {layer.name: layer for layer in able}
    for _ in range(FRONTIER_ROUNDS):
        if out_of_time():
            break
        slope = _pooled_slope(points)
        options = _options(ctx, by_name, local, points, slope)
        wanted: dict[str, tuple] = {}
        for allocation in _frontier_allocations(ctx, sub, options, by_name):
            for name, option in allocation.items():
                key = (name, *option.key)
                distance = _distance(key, local, points[name])
                if distance > math.log(FRONTIER_FACTOR) and distance > wanted.get(name, (None, 0.0))[1]:
                    wanted[name] = (key, distance)
        if not wanted:
            break
        for key, _ in wanted.values():
            measure(key)
    slope = _pooled_slope(points)
    for key, e in local.items():
        entry = points[key[0]].get(key)
        if entry is None:
            proxy, drop = _predict(e, key[1], points[key[0]], slope)
            entry = {"drop": drop, "proxy": proxy, "local_error": e}
        entry["predicted"] = key not in points[key[0]]
        fitted = ctx.factors_memo.get(key)  # a measured rank's fit; else its estimate's error
        entry["weight_error"] = weight_errors[key] if fitted is None else fitted.rel_error
        measured[key] = entry
    for (name, method, rank), entry in measured.items():
        label = f"{method}:{ctx.methods[method].rank_label(rank)}"
        decisions[name]["sensitivity"][label] = entry["drop"]
    ctx.cache.save()
    ctx.prediction = {
        "subsample": len(sub.indices),
        "measured_on_subsample": sum(len(p) for p in points.values()),
        "predicted": sum(e.get("predicted", False) for e in measured.values()),
        "measured_layers": len(rest),
        "slope": slope,
        "plans_on_subsample": sub.plans,
        # Factor fits (HOOI, CP-ALS, …) against cheap estimates read for local errors and shapes.
        "fits": ctx.fits - fits_before,
        "estimates": ctx.estimates - estimates_before,
    }
    return measured, hits + ctx.cache.hits


def _local_errors(ctx, layer, layer_stats, candidates, local, weight_errors, measured, bar) -> None:
    """Local errors of every candidate (method, rank) of `layer` into `local` (math only), high
    ranks first, each method stopping past LOCAL_STOP_ERROR; refusals go to `measured`."""
    dense_energy = output_energy(layer, layer_stats, dense_weight(layer))
    for method in candidates[layer.name]:
        impl = ctx.methods[method]
        ranks = sorted(impl.candidate_ranks(layer), key=lambda r: -impl.cost(layer, r).params)
        for rank in ranks:
            # The method's estimate (a truncated HOSVD for Tucker-2: no HOOI per rank); only
            # the ranks measured below or put in a plan are fitted.
            factors = ctx.estimate_for(layer, method, rank)
            key = (layer.name, method, rank)
            if isinstance(factors, Refusal):
                measured[key] = {
                    "drop": float("inf"),
                    "proxy": float("inf"),
                    "weight_error": factors.rel_error,
                    "refused": factors.reason,
                }
            else:
                local[key] = local_error(layer, layer_stats, impl, factors, dense_energy)
                weight_errors[key] = factors.rel_error
            bar.update(1)
            if local.get(key, 0.0) > LOCAL_STOP_ERROR:
                break  # lower ranks only lose more (and their fits cost the most)


def _frontier_allocations(ctx, sub, options, by_name) -> list[dict]:
    """The allocations at the largest τ of the grid whose (unrefined) plan keeps the subsample within
    the budget, and at the next τ above it: where verification will look."""
    grid = B.tau_grid(options)
    allocations = [B.allocate(options, tau) for tau in grid]
    last_pass = 0
    for index, allocation in enumerate(allocations):
        if index == 0 or not allocation:
            continue
        plan = [
            Choice(by_name[n], o.key[0], ctx.factors_for(by_name[n], *o.key)) for n, o in allocation.items()
        ]
        if sub.plan_drop(ctx, plan) <= ctx.max_drop:
            last_pass = index
        else:
            break  # larger τ only add loss
    return allocations[last_pass : last_pass + 2]


def _pooled_slope(points) -> float:
    """The median log-log slope of proxy against local error over (layer, method) pairs of measured
    points, clamped to SLOPE_RANGE; 1 (first order) before any pair exists."""
    slopes = []
    for mine in points.values():
        by_method: dict[str, list] = {}
        for (_, method, _), v in mine.items():
            if v["local_error"] > 0 and v["proxy"] > 0:
                by_method.setdefault(method, []).append((v["local_error"], v["proxy"]))
        for pts in by_method.values():
            pts.sort()
            (e1, p1), (e2, p2) = pts[0], pts[-1]
            if e2 > e1 * 1.5:
                slopes.append(math.log(p2 / p1) / math.log(e2 / e1))
    if not slopes:
        return 1.0
    return float(min(max(np.median(slopes), SLOPE_RANGE[0]), SLOPE_RANGE[1]))


def _options(ctx, by_name, local, points, slope) -> list[B.Option]:
    options = []
    for key, e in local.items():
        name, method, rank = key
        entry = points[name].get(key)
        proxy = entry["proxy"] if entry is not None else _predict(e, method, points[name], slope)[0]
        # Savings in parameters suffice to find the frontier; the real objective prices options later.
        saving = by_name[name].params - ctx.methods[method].cost(by_name[name], rank).params
        options.append(B.Option(name, (method, rank), saving, max(float(proxy), 0.0)))
    return options


def _distance(key, local, mine: dict) -> float:
    """How far `key` is from the layer's measured points: |log e ratio| to the nearest, +∞ when its
    method has no measured point and the layer has one of another method (methods differ in gain)."""
    if key in mine:
        return 0.0
    same = [k for k in mine if k[1] == key[1]]
    if not same:
        return float("inf")
    e = max(local[key], 1e-12)
    return min(abs(math.log(e / max(mine[k]["local_error"], 1e-12))) for k in same)


def _predict(e: float, method: str, mine: dict, slope: float) -> tuple[float, float]:
    """(proxy, drop) at local error e from the layer's measured points (module doc): interpolated in
    log-log between the two same-method points around e; outside them, along the slope from the
    nearest one, taken conservatively (never below 1 upward, never above 1 downward), so that a
    wrong slope overprices an option (a smaller plan) rather than underprices it (a failed plan)."""
    if not mine:
        return float("inf"), float("inf")
    e = max(e, 1e-12)
    same = [v for k, v in mine.items() if k[1] == method] or list(mine.values())
    pts = sorted((max(v["local_error"], 1e-12), max(v["proxy"], PROXY_FLOOR)) for v in same)
    below = [p for p in pts if p[0] <= e]
    above = [p for p in pts if p[0] >= e]
    if below and above and above[0][0] > below[-1][0]:
        (e1, p1), (e2, p2) = below[-1], above[0]
        proxy = p1 * (e / e1) ** (math.log(p2 / p1) / math.log(e2 / e1))
    elif below and above:
        proxy = below[-1][1]
    elif below:  # above every measured point
        proxy = below[-1][1] * (e / below[-1][0]) ** max(slope, 1.0)
    else:  # below every measured point
        proxy = above[0][1] * (e / above[0][0]) ** min(slope, 1.0)
    ratio = max(max(v["drop"], 0.0) / max(v["proxy"], PROXY_FLOOR) for v in mine.values())
    return proxy, proxy * ratio
