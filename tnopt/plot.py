"""The search's picture: metric drop against objective saving for every verified plan, and the
kept-rank fraction of each layer in the final model."""

from __future__ import annotations

from pathlib import Path

from tnopt.report import Report


def plot_search(report: Report, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on build machines
    import matplotlib.pyplot as plt

    curve = report.search.get("curve", [])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    objective_total = report.search.get("objective_total") or 1.0
    for passed, marker, label in ((True, "o", "within budget"), (False, "x", "over budget")):
        points = [p for p in curve if p["passed"] == passed]
        # The error bar is the drop's standard error: a plan passes when drop + error ≤ budget.
        left.errorbar(
            [p["saving"] / objective_total * 100 for p in points],
            [p["drop"] * 100 for p in points],
            yerr=[p["margin"] * 100 for p in points],
            fmt=marker,
            capsize=3,
            label=label,
        )
    left.axhline(report.budget["max_drop"] * 100, color="gray", linestyle="--", label="budget")
    left.set_xlabel(f"{report.budget.get('objective', 'flops')} saved in candidate layers (%)")
    left.set_ylabel(f"{report.budget['metric']} drop on calibration data (%)")
    left.set_title("search: verified plans")
    left.legend()
    names = [layer.name for layer in report.layers]
    kept = [
        layer.params_after / layer.params_before
        if layer.decision == "rewritten" and layer.params_before
        else 1.0
        for layer in report.layers
    ]
    right.barh(range(len(names)), kept)
    right.set_yticks(range(len(names)), names, fontsize=7)
    right.invert_yaxis()
    right.set_xlabel("parameters kept (fraction of dense)")
    right.set_title("final model per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
