"""What a run did, per layer and overall: JSON for machines, a table for people, a PNG for the search."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class ModelSummary:
    op_counts: dict[str, int]
    params: int
    flops: int  # of Conv / Gemm / constant-weight MatMul at the inferred shapes (symbolic dims = 1)
    file_bytes: int


@dataclass
class LayerReport:
    name: str
    op: str
    weight_shape: list[int]
    decision: str  # rewritten | kept | skipped
    reason: str = ""
    method: str | None = None
    rank: str | None = None
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    bytes_before: int = 0  # the weight's constants as stored in the file
    bytes_after: int = 0  # the factors' constants (kept layers: as before)
    weight_error: float | None = None  # ‖W − Ŵ‖ / ‖W‖
    sensitivity: dict[str, float] = field(default_factory=dict)  # "method:rank" → metric drop, layer alone
    latency_before_ms: float | None = None
    latency_after_ms: float | None = None
    # "method:rank" → the latency guard's verdict (faster | slower | undecided and the FLOPs rule)
    latency_verdicts: dict[str, str] = field(default_factory=dict)
    factor_notes: dict = field(default_factory=dict)  # e.g. data_aware, corrected, mode (MPO)


@dataclass
class Report:
    model: str
    provider: str
    before: ModelSummary
    after: ModelSummary | None = None
    layers: list[LayerReport] = field(default_factory=list)
    data: str = ""
    eval_data: str = ""
    metrics: dict[str, float] = field(default_factory=dict)  # compressed vs original on eval data
    budget: dict | None = None
    budget_met: bool | None = None
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    search: dict = field(default_factory=dict)
    factors: dict = field(default_factory=dict)  # how factors were fitted: data_aware, correct
    # tnopt version, command line, input/output paths and SHA-256 (filled by the CLI)
    run: dict = field(default_factory=dict)
    heal: dict = field(default_factory=dict)  # tnopt.heal: config, per-plan drops before/after, time
    # Wall time and peak RSS per pipeline stage (tnopt.stages); how the data was batched.
    stages: list[dict] = field(default_factory=list)
    batching: dict = field(default_factory=dict)
    # Whole-model latency before/after at the deployment batch (tnopt.latency.whole_model_latency).
    latency: dict = field(default_factory=dict)

    @property
    def rewritten(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.decision == "rewritten"]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        """Strict JSON (RFC 8259): NaN and ±Infinity, which json.dumps writes by default and strict
        parsers reject, become null."""
        return json.dumps(_strict(self.to_dict()), indent=2, allow_nan=False) + "\n"

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    def budget_line(self) -> str:
        """The budget's outcome in one line: what was charged, the limit, and the drop on the data the
        search never verified on (empty without a budget)."""
        budget = self.budget or {}
        if "max_drop" not in budget:
            return ""
        relative = " (relative)" if budget.get("drop_type") == "relative" else ""
        head = f"budget: {budget.get('metric', 'metric')} drop <= {budget['max_drop']:g}{relative}"
        verdict = {True: "met", False: "NOT met", None: "unknown"}[self.budget_met]
        if self.budget_met is False and self.layers and not self.rewritten:
            # "NOT met (0.0000 on the evaluation data …)" read as a contradiction: it is the search
            # that found no compression within the budget, and the saved original loses nothing.
            verdict += ": no plan with a rewrite was verified within it, the original is saved"
        parts = []
        if budget.get("drop_evaluation") is not None:
            parts.append(f"{budget['drop_evaluation']:.4f} on the evaluation data")
        if budget.get("drop_calibration") is not None:
            parts.append(
                f"{budget['drop_calibration']:.4f} ± {budget.get('margin_calibration') or 0.0:.4f} "
                "on the calibration data"
            )
        return f"{head}: {verdict}" + (f" ({'; '.join(parts)})" if parts else "")

    def summary_table(self) -> str:
        after = self.after or self.before
        rows = [("", "before", "after", "ratio")]
        rows.append(
            (
                "params",
                f"{self.before.params:,}",
                f"{after.params:,}",
                _ratio(self.before.params, after.params),
            )
        )
        rows.append(
            ("FLOPs", f"{self.before.flops:,}", f"{after.flops:,}", _ratio(self.before.flops, after.flops))
        )
        rows.append(
            (
                "file bytes",
                f"{self.before.file_bytes:,}",
                f"{after.file_bytes:,}",
                _ratio(self.before.file_bytes, after.file_bytes),
            )
        )
        for op in sorted(set(self.before.op_counts) | set(after.op_counts)):
            b, a = self.before.op_counts.get(op, 0), after.op_counts.get(op, 0)
            rows.append((f"  {op}", str(b), str(a), "" if a == b else f"{a - b:+d}"))
        text = [format_table(rows)]
        if self.metrics:
            metric_rows = [("metric (eval data)", "original", "compressed")]
            for key, value in self.metrics.items():
                if key.endswith("_original"):
                    continue
                original = self.metrics.get(f"{key}_original", _REFERENCE.get(key))
                metric_rows.append((key, "" if original is None else f"{original:.4f}", f"{value:.4f}"))
            text.append(format_table(metric_rows))
        if self.latency:
            lat = self.latency
            text.append(
                f"latency at batch {lat['batch']} ({self.provider}): {lat['before_ms']:.2f} ms → "
                f"{lat['after_ms']:.2f} ms ({lat['speedup']:.2f}x; paired ratio after/before "
                f"{lat['ratio']:.3f}, 95% interval {lat['ratio_low']:.3f}–{lat['ratio_high']:.3f}, "
                f"{lat['rounds']} interleaved rounds)"
            )
        if self.stages:
            stage_rows = [("stage", "wall s", "peak RSS MiB")]
            for stage in self.stages:
                stage_rows.append((stage["stage"], f"{stage['wall_s']:.2f}", f"{stage['peak_rss_mb']:.0f}"))
            text.append(format_table(stage_rows))
        return "\n\n".join(text)

    def heal_table(self) -> str:
        """Each plan healing judged: held-out drop before and after healing, and what it cost."""
        rows = [
            (
                "proxy budget",
                "saving",
                "drop before",
                "drop after",
                "± se",
                "gate",
                "steps",
                "sample-steps",
                "path",
                "s",
            )
        ]
        for plan in self.heal.get("plans", []):
            heal = plan.get("heal") or {}
            looseness = plan.get("looseness")
            rows.append(
                (
                    "fixed ranks" if looseness is None else f"x{looseness:g}",
                    f"{plan['saving']:,.0f}" if "saving" in plan else "",
                    _number(plan.get("drop_before")),
                    _number(plan.get("drop_after")),
                    _number(plan.get("margin")),
                    {True: "pass", False: "fail"}.get(plan.get("passed"), ""),
                    str(heal.get("steps", "")),
                    str(heal.get("sample_steps", "")),
                    heal.get("path", ""),
                    f"{plan.get('seconds', 0):.0f}",
                )
            )
        return f"healing ({self.heal.get('metric', '')} on {self.heal.get('holdout', '')}):\n" + format_table(
            rows
        )

    def layer_table(self) -> str:
        header = (
            "layer",
            "op",
            "weight",
            "decision",
            "method",
            "rank",
            "params",
            "bytes",
            "FLOPs",
            "err",
            "reason",
        )
        rows = [header]
        for layer in self.layers:
            rewritten = layer.decision == "rewritten"
            rows.append(
                (
                    layer.name,
                    layer.op,
                    "x".join(map(str, layer.weight_shape)),
                    layer.decision,
                    layer.method or "",
                    layer.rank or "",
                    _ratio(layer.params_before, layer.params_after) if rewritten else "",
                    _ratio(layer.bytes_before, layer.bytes_after) if rewritten and layer.bytes_before else "",
                    _ratio(layer.flops_before, layer.flops_after) if rewritten else "",
                    "" if layer.weight_error is None else f"{layer.weight_error:.3f}",
                    layer.reason,
                )
            )
        return format_table(rows)


_REFERENCE = {"agreement": 1.0, "cosine": 1.0, "rel-l2": 0.0}


def _number(value) -> str:
    return "" if value is None else f"{value:.4f}"


def _ratio(before: int, after: int) -> str:
    return f"{before / after:.2f}x" if after else "-"


def _strict(value):
    """`value` with numpy scalars made Python, tuples/sets made lists and non-finite floats None."""
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_strict(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    elif hasattr(value, "tolist"):
        return _strict(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def format_table(rows: list[tuple]) -> str:
    """Left-aligned text columns; the first row is the header."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
