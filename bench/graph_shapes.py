"""Exporter graph shapes a new user may bring: run the CLI on each, hold every output to the contract.

    python bench/graph_shapes.py [--only SUBSTRING] [--keep DIR]

Each case (built in bench/graph_shape_cases.py) is a small model written the way an exporter writes
it (torch.onnx.export with the CPU torch, or onnx.helper where the shape is easier to state
directly), with 64 random calibration samples. For
each case the CLI runs as a user would (`tnopt IN -o OUT ... --data calib.npz`) in these modes:

- `full`:   `--rank-ratio 1 --allow-growth` — every rewrite at full rank must reproduce the original
            (relative L2 of every output ≤ 1e-3, 3e-2 for float16, on the calibration inputs and on fresh
            ones): a silently wrong graph fails here;
- `half`:   `--rank-ratio 0.5` — forced rewrites at half rank;
- `budget`: `--budget 1% --no-latency-guard` — the budgeted search (without the guard, which keeps
            layers this small dense: the point is the budgeted path's graphs on each shape);
- `heal`:   `--rank-ratio 0.5 --heal 5` — five healing steps (torch), whole-graph or block-local;
- `inspect`: `tnopt inspect MODEL --json` — parseable JSON listing the layers.

Conv cases also run `full` once per method that accepts a Conv (tucker2, cp, cut-o, cut-i,
cut-spatial, mpo, tucker2-grouped / tucker2-transpose where they apply).

Every run must end with exit 0 (3 allowed under a budget) and a valid output, or exit 2 with one
stderr line; never a traceback or exit 4. A valid output passes onnx.checker and an onnxruntime
load and keeps the input's IR version, opsets, metadata_props, doc strings, graph input/output
names, element types and dims (symbolic ones by name), local functions, and the symbolic dims of
the value_info entries it still has. The table gives, per run, the exit code, each layer's decision
(the reason where it was not rewritten), the worst output difference against the original, and the
contract violations found ("ok" when none).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from graph_shape_cases import CASES, rng
from onnx import TensorProto

# --- running and checking --------------------------------------------------------------------------


def run_model(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}
    first = session.get_inputs()[0]
    fixed = first.shape[0] if first.shape and isinstance(first.shape[0], int) else None
    samples = len(feeds[first.name]) if np.ndim(feeds[first.name]) else 0
    if fixed is None or samples in (0, fixed) or samples % fixed:
        return session.run(None, feeds)
    # A fixed-batch export (batch 1) runs its samples a batch at a time.
    runs = [
        session.run(None, {k: v[i : i + fixed] for k, v in feeds.items()}) for i in range(0, samples, fixed)
    ]
    return [np.concatenate(parts) for parts in zip(*runs)]


def _dims(value):
    t = value.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in t.shape.dim]


def _signature(values):
    return [(v.name, v.type.tensor_type.elem_type, _dims(v)) for v in values]


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attribute.g)


def contract_problems(original: onnx.ModelProto, produced: onnx.ModelProto) -> list[str]:
    problems = []
    try:
        onnx.checker.check_model(produced)
    except Exception as exc:  # noqa: BLE001 - any checker failure is a finding
        problems.append(f"checker: {str(exc).splitlines()[0][:80]}")
    initializers = {t.name for t in original.graph.initializer}
    data_in = [i for i in original.graph.input if i.name not in initializers]
    out_in = [i for i in produced.graph.input if i.name not in {t.name for t in produced.graph.initializer}]
    if _signature(data_in) != _signature(out_in):
        problems.append(f"inputs {_signature(data_in)} -> {_signature(out_in)}")
    listed = [i.name for i in original.graph.input if i.name in initializers]
    kept = {i.name for i in produced.graph.input}
    # Overridable defaults (IR >= 4, not every initializer listed by convention) stay inputs.
    if original.ir_version >= 4 and set(listed) != initializers:
        lost = [n for n in listed if n not in kept]
        if lost:
            problems.append(f"overridable input(s) {lost} no longer graph inputs")
    if _signature(original.graph.output) != _signature(produced.graph.output):
        problems.append(f"outputs {_signature(original.graph.output)} -> {_signature(produced.graph.output)}")
    if produced.ir_version != original.ir_version:
        problems.append(f"IR {original.ir_version} -> {produced.ir_version}")
    opsets = lambda m: [(o.domain, o.version) for o in m.opset_import]  # noqa: E731
    if opsets(original) != opsets(produced):
        problems.append(f"opsets {opsets(original)} -> {opsets(produced)}")
    props = lambda m: [(p.key, p.value) for p in m.metadata_props]  # noqa: E731
    if props(original) != props(produced):
        problems.append("metadata_props changed")
    for attr in ("doc_string", "producer_name", "producer_version", "model_version", "domain"):
        if getattr(original, attr) != getattr(produced, attr):
            problems.append(f"model {attr} changed")
    if props(original.graph) != props(produced.graph):
        problems.append("graph metadata_props changed")
    io_docs = lambda m: {v.name: v.doc_string for v in [*m.graph.input, *m.graph.output]}  # noqa: E731

    def io_props(m):
        return {
            v.name: [(p.key, p.value) for p in v.metadata_props] for v in [*m.graph.input, *m.graph.output]
        }

    # Compared where the value is in both: a rewritten weight listed as input by convention goes.
    theirs = io_props(produced)
    if any(name in theirs and theirs[name] != props for name, props in io_props(original).items()):
        problems.append("graph input/output metadata_props changed")
    docs_out = io_docs(produced)
    if any(name in docs_out and docs_out[name] != doc for name, doc in io_docs(original).items()):
        problems.append("graph input/output doc strings changed")
    if original.graph.doc_string != produced.graph.doc_string:
        problems.append("graph doc_string changed")
    if [f.name for f in original.functions] != [f.name for f in produced.functions]:
        problems.append("local functions changed")
    if original.graph.name != produced.graph.name:
        problems.append(f"graph name {original.graph.name!r} -> {produced.graph.name!r}")
    kept_nodes = {n.name: n for n in _all_nodes(produced.graph)}
    for node in _all_nodes(original.graph):
        other = kept_nodes.get(node.name) if node.name else None
        if other is None:
            continue
        if other.doc_string != node.doc_string:
            problems.append(f"doc string of node {node.name} changed")
        theirs = {(p.key, p.value) for p in other.metadata_props}
        if not {(p.key, p.value) for p in node.metadata_props} <= theirs:
            problems.append(f"metadata_props of node {node.name} lost")
    produced_vi = {v.name: _dims(v) for v in produced.graph.value_info}
    for value in original.graph.value_info:
        dims = _dims(value)
        if value.name in produced_vi and dims is not None and produced_vi[value.name] is not None:
            mine = produced_vi[value.name]
            if len(mine) != len(dims) or any(isinstance(a, str) and a != b for a, b in zip(dims, mine)):
                problems.append(f"value_info {value.name} {dims} -> {mine}")
    try:
        ort.InferenceSession(produced.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        problems.append(f"onnxruntime: {str(exc).splitlines()[0][:80]}")
    return problems


def fresh_feeds(feeds: dict) -> dict:
    """Other inputs than the calibration ones (float inputs moved by noise, inputs fed whole too): a
    rewrite that reads a constant where the model read an input differs on them."""
    g = rng(99)
    return {
        k: (v + g.standard_normal(v.shape).astype(v.dtype) if v.dtype.kind == "f" else v)
        for k, v in feeds.items()
    }


def worst_difference(original, produced, feeds) -> float:
    return max(_difference(original, produced, feeds), _difference(original, produced, fresh_feeds(feeds)))


def _difference(original, produced, feeds) -> float:
    expected, got = run_model(original, feeds), run_model(produced, feeds)
    worst = 0.0
    for e, g in zip(expected, got):
        e, g = np.asarray(e, np.float64), np.asarray(g, np.float64)
        if e.shape != g.shape:
            return float("inf")
        worst = max(worst, float(np.linalg.norm(e - g) / max(np.linalg.norm(e), 1e-30)))
    return worst


def layer_decisions(report_path: Path) -> list[dict]:
    if not report_path.exists():
        return []
    return [
        {"name": x["name"], "decision": x["decision"], "method": x.get("method"), "reason": x.get("reason")}
        for x in json.loads(report_path.read_text())["layers"]
    ]


def layer_summary(report_path: Path) -> str:
    if not report_path.exists():
        return "-"
    layers = json.loads(report_path.read_text())["layers"]
    parts = []
    for layer in layers:
        if layer["decision"] == "rewritten":
            parts.append(f"{layer['name']}: rewritten ({layer.get('method')})")
        else:
            parts.append(f"{layer['name']}: {layer['decision']} — {layer.get('reason')}")
    return "; ".join(parts)


def run_inspect(folder: Path) -> dict:
    """`tnopt inspect MODEL --json`: exit 0 with one entry per listed layer, or exit 2 in one line."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "tnopt", "inspect", str(folder / "model.onnx"), "--json"],
        capture_output=True,
        text=True,
    )
    problems, summary = [], ""
    if "Traceback" in result.stderr or result.returncode not in (0, 2):
        problems.append(f"inspect exit {result.returncode}: {result.stderr.strip()[-120:]}")
    elif result.returncode == 2:
        lines = result.stderr.strip().splitlines()
        summary = lines[-1] if lines else ""
        if len(lines) != 1:
            problems.append(f"inspect exit 2 with {len(lines)} stderr lines")
    else:
        try:
            listed = json.loads(result.stdout)
            layers = listed["layers"] if isinstance(listed, dict) else listed
            summary = (
                f"{len(layers)} layers listed, {sum(bool(x.get('candidate')) for x in layers)} candidates"
            )
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"inspect --json unreadable ({exc})")
    return {
        "exit": result.returncode,
        "difference": None,
        "layers": summary,
        "problems": problems,
        "seconds": time.perf_counter() - started,
    }


def run_cli(folder: Path, mode: str, extra: list[str], original, feeds, tolerance: float):
    model_path, out, report = folder / "model.onnx", folder / f"out-{mode}.onnx", folder / f"r-{mode}.json"
    before = model_path.read_bytes()
    for stale in (out, report):
        stale.unlink(missing_ok=True)
    args = [
        str(model_path),
        "-o",
        str(out),
        "--data",
        str(folder / "calib.npz"),
        "--no-cache",
        "-q",
        "--report",
        str(report),
        *extra,
    ]
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "tnopt", *args], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    problems = []
    if "Traceback" in result.stderr or result.returncode not in (0, 2, 3):
        last = result.stderr.strip().splitlines()[-1][:120] if result.stderr.strip() else ""
        problems.append(f"exit {result.returncode}: {last}")
    if model_path.read_bytes() != before:
        problems.append("input modified")
    difference = None
    if result.returncode == 2:
        lines = result.stderr.strip().splitlines()
        if len(lines) != 1:
            problems.append(f"exit 2 with {len(lines)} stderr lines")
        summary = lines[-1] if lines else ""
        if out.exists():
            problems.append("exit 2 wrote an output")
    elif result.returncode in (0, 3) and out.exists():
        produced = onnx.load(str(out))
        problems += contract_problems(original, produced)
        try:
            difference = worst_difference(original, produced, feeds)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"run: {str(exc).splitlines()[0][:80]}")
        if mode.startswith("full") and difference is not None and difference > tolerance:
            problems.append(f"full-rank output differs by {difference:.2e} > {tolerance:.0e}")
        summary = layer_summary(report)
    else:
        summary = layer_summary(report)
    return {
        "exit": result.returncode,
        "difference": difference,
        "layers": summary,
        "decisions": layer_decisions(report),
        "problems": problems,
        "seconds": seconds,
    }


def _cell(row) -> str:
    """exit · rewritten/listed · worst output difference, for one run."""
    if row["exit"] == 2:
        return "exit 2"
    listed = row.get("decisions") or []
    rewritten = sum(x["decision"] == "rewritten" for x in listed)
    diff = "" if row["difference"] is None else f" · {row['difference']:.0e}"
    return f"exit {row['exit']} · {rewritten}/{len(listed)}{diff}"


def print_summary(rows) -> None:
    """One row per case: each mode's outcome, the skip / refusal reasons met, the contract verdict."""
    print()
    print(
        "| case | full rank (exit · rewritten/listed · worst rel. L2) | half rank | budget 1% | heal 5 steps "
        "| full rank per Conv method | not rewritten: why | contract |"
    )
    print("|---|---|---|---|---|---|---|---|")
    cases = list(dict.fromkeys(row["case"] for row in rows))
    for name in cases:
        mine = [row for row in rows if row["case"] == name]
        by_mode = {row["mode"]: row for row in mine}
        methods = [row for row in mine if row["mode"].startswith("full:")]
        method_cell = "-"
        if methods:
            ok = [row["mode"][5:] for row in methods if row["exit"] == 0 and not row["problems"]]
            refused = [row["mode"][5:] for row in methods if row["exit"] == 2]
            method_cell = f"{len(ok)} exact" + (f", refused: {', '.join(refused)}" if refused else "")
        reasons = set()
        for row in mine:
            if row["mode"] in ("build", "inspect") or row["mode"].startswith("full:"):
                continue  # a method run's refusals are that method's, in the per-method column
            if row["exit"] == 2:
                message = row["layers"].removeprefix("tnopt: error: ")
                reasons.add("exit 2: " + message.split("model.onnx: ", 1)[-1][:160])
            for x in row.get("decisions") or []:
                if x["decision"] == "skipped":
                    reasons.add(f"{x['name']}: {x['reason']}")
        problems = sorted({p for row in mine for p in row["problems"]})
        verdict = "ok" if not problems else "**" + "; ".join(problems) + "**"
        cells = [_cell(by_mode[m]) if m in by_mode else "-" for m in ("full", "half", "budget", "heal")]
        why = "<br>".join(sorted(reasons)) or "-"
        print(f"| {name} | {' | '.join(cells)} | {method_cell} | {why} | {verdict} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="run the cases whose name contains this")
    parser.add_argument("--keep", help="build the cases in this folder (kept) instead of a temporary one")
    parser.add_argument("--modes", default="inspect,full,half,budget,heal,methods")
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--runs", action="store_true", help="also print one table row per run")
    parser.add_argument(
        "--summarize", help="print the summary of a --json file of an earlier sweep, run nothing"
    )
    args = parser.parse_args(argv)
    if args.summarize:
        print_summary(json.loads(Path(args.summarize).read_text()))
        return 0
    modes = args.modes.split(",")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="graph_shapes-"))
    rows = []
    for entry in CASES:
        if args.only and args.only not in entry.name:
            continue
        folder = root / entry.name
        folder.mkdir(parents=True, exist_ok=True)
        try:
            model, feeds = entry.build()
            onnx.checker.check_model(model)
            run_model(model, feeds)
        except Exception as exc:  # noqa: BLE001 - a case this machine cannot build is reported, not fatal
            rows.append(
                {
                    "case": entry.name,
                    "mode": "build",
                    "exit": None,
                    "difference": None,
                    "layers": "-",
                    "problems": [f"case not built: {str(exc).splitlines()[0][:100]}"],
                    "seconds": 0,
                }
            )
            print(f"{entry.name}: not built ({exc})", file=sys.stderr)
            continue
        (folder / "model.onnx").write_bytes(model.SerializeToString())
        np.savez(folder / "calib.npz", **feeds)
        half = any(f.dtype == np.float16 for f in feeds.values()) or any(
            t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer
        )
        tolerance = 3e-2 if half else 1e-3
        runs = []
        if "inspect" in modes:
            runs.append(("inspect", []))
        if "full" in modes:
            runs.append(("full", ["--rank-ratio", "1", "--allow-growth"]))
        if "half" in modes:
            runs.append(("half", ["--rank-ratio", "0.5"]))
        if "budget" in modes:
            # Without the latency guard: these layers are too small to run faster factorized, and the
            # point is the budgeted path's graphs (switchboard, correction, export) on each shape.
            runs.append(("budget", ["--budget", "1%", "--no-latency-guard"]))
        if "heal" in modes:
            runs.append(("heal", ["--rank-ratio", "0.5", "--heal", "5"]))
        if "methods" in modes and entry.conv:
            runs += [
                (f"full:{m}", ["--rank-ratio", "1", "--allow-growth", "--method", m]) for m in entry.methods
            ]
        for mode, extra in runs:
            if mode == "inspect":
                row = {"case": entry.name, "mode": mode, **run_inspect(folder)}
            else:
                row = {
                    "case": entry.name,
                    "mode": mode,
                    **run_cli(folder, mode, extra, model, feeds, tolerance),
                }
            rows.append(row)
            verdict = "ok" if not row["problems"] else " | ".join(row["problems"])
            diff = "-" if row["difference"] is None else f"{row['difference']:.1e}"
            print(
                f"{entry.name:32s} {mode:18s} exit {row['exit']} diff {diff:8s} "
                f"{row['seconds']:5.1f}s  {verdict}",
                flush=True,
            )
    if args.runs:
        print()
        print("| case | mode | exit | worst rel. diff | layers (decision — reason) | contract |")
        print("|---|---|---|---|---|---|")
        for row in rows:
            diff = "-" if row["difference"] is None else f"{row['difference']:.1e}"
            verdict = "ok" if not row["problems"] else "**" + "; ".join(row["problems"]) + "**"
            print(f"| {row['case']} | {row['mode']} | {row['exit']} | {diff} | {row['layers']} | {verdict} |")
    print_summary(rows)
    failures = sum(bool(row["problems"]) for row in rows)
    print(f"\n{len(rows)} runs, {failures} with contract violations; cases built in {root}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
