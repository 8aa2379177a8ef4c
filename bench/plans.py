"""Behaviour check for refactors: the (layer, method, rank) plan and evaluation drop per model and budget.

    python bench/plans.py [--models cnn4,vgg,resnet] [--budgets 0.005,0.01,0.02] [--out plans.json]
    python bench/plans.py --compare before.json after.json

Runs `tnopt.compress` through its keyword API only (so the same script runs against older trees):
calibration = the first 512 samples of models/calib.npz, evaluation = models/eval.npz, CPU provider,
latency guard off (its timings are the one non-deterministic input), and one empty temporary cache
per model shared by its budgets in order, as bench/budget.py does. Two runs of the same code give
the same plans; `--compare` says where two result files differ (plans exactly, drops to 1e-6).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
# The same splits as bench/budget.py (that script exists unchanged in the trees compared).
from budget import load_splits  # noqa: E402


def run(models, budgets, calib_n):
    import tnopt

    calib, evaluation = load_splits(calib_n)
    rows = []
    for name in models:
        cache = tempfile.mkdtemp(prefix=f"tnopt-plans-{name}-")
        for budget in budgets:
            start = time.perf_counter()
            _, report = tnopt.compress(
                str(ROOT / "models" / f"{name}.onnx"),
                budget=budget,
                data=calib,
                eval_data=evaluation,
                provider="cpu",
                cache_dir=cache,
                latency_guard=False,
            )
            plan = [[layer.name, layer.method, layer.rank] for layer in report.rewritten]
            row = {
                "model": name,
                "budget": budget,
                "plan": plan,
                "eval_drop": report.metrics["top1_original"] - report.metrics["top1"],
                "budget_met": report.budget_met,
                "seconds": time.perf_counter() - start,
            }
            rows.append(row)
            print(f"{name} {budget:.1%} drop {row['eval_drop']:+.6f} {row['seconds']:.0f}s", flush=True)
            for layer, method, rank in plan:
                print(f"    {layer:28s} {method:18s} {rank}", flush=True)
    return rows


def markdown(rows) -> str:
    lines = ["| model | budget | eval drop | plan (layer: method rank) |", "|---|---|---|---|"]
    for row in rows:
        plan = "; ".join(f"{layer}: {method} {rank}" for layer, method, rank in row["plan"]) or "dense"
        lines.append(f"| {row['model']} | {row['budget']:.1%} | {row['eval_drop']:+.6f} | {plan} |")
    return "\n".join(lines)


def compare(before, after) -> list[str]:
    keyed = {(r["model"], r["budget"]): r for r in before["rows"]}
    problems = []
    for row in after["rows"]:
        old = keyed.get((row["model"], row["budget"]))
        where = f"{row['model']} {row['budget']:.1%}"
        if old is None:
            problems.append(f"{where}: not in the first file")
            continue
        if old["plan"] != row["plan"]:
            problems.append(f"{where}: plans differ\n  {old['plan']}\n  {row['plan']}")
        if abs(old["eval_drop"] - row["eval_drop"]) > 1e-6:
            problems.append(f"{where}: eval drop {old['eval_drop']:+.6f} vs {row['eval_drop']:+.6f}")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="cnn4,vgg,resnet")
    p.add_argument("--budgets", default="0.005,0.01,0.02")
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--out", help="write the rows (JSON) here")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = p.parse_args(argv)
    if args.compare:
        before, after = (json.loads(Path(f).read_text()) for f in args.compare)
        for label, data in (("before", before), ("after", after)):
            print(f"\n{label}: commit {data['commit']}\n\n{markdown(data['rows'])}")
        problems = compare(before, after)
        print("\n" + ("\n".join(problems) if problems else "identical plans, eval drops equal to 1e-6"))
        return 1 if problems else 0
    warnings.simplefilter("ignore")
    budgets = [float(b) for b in args.budgets.split(",")]
    rows = run(args.models.split(","), budgets, args.calib)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path.cwd()
    ).stdout.strip()
    print("\n" + markdown(rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"commit": commit, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
