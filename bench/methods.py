"""Every method at matched parameter counts, per reference model and all-MiniLM-L6-v2, plus what
`auto` picks; and MPO storage mode at 10x/100x/1000x on fully-connected layers.

    python bench/methods.py [--models fc2,lenet5,cnn4,vgg,resnet,minilm] [--out bench/RESULTS.md]

Matched parameters: each layer a method accepts is given the largest rank whose factors hold at
most 1/f of the dense layer's parameters (f = 2, 4, 8); layers it does not accept stay dense, and
the table states the parameter ratio reached over all candidate layers. Metric on the evaluation
data: top-1 for the Fashion-MNIST models (models/eval.npz), cosine similarity of the sentence
embeddings for MiniLM (64 real sentences, first 32 calibrate, last 32 evaluate). Factors are
data-aware with sequential correction (tnopt's defaults with data).
`auto`: for each layer and f, every accepting method is tried alone on the calibration data in
onnxruntime and the one with the best metric is kept.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))
sys.path.insert(0, str(ROOT / "bench"))

from tnopt.passes import METHODS  # noqa: E402

import tnopt  # noqa: E402
from tnopt.analyze import analyze  # noqa: E402
from tnopt.io import load_model  # noqa: E402
from tnopt.pipeline import applicable_methods  # noqa: E402
from tnopt.report import format_table  # noqa: E402

FACTORS = (2, 4, 8)
# `auto` tries every method on every layer alone; on MiniLM (36 layers of a 90 MB model, ~2.5 s a
# trial on 2 cores) that is ~300 compiles, so it is not run there.
NO_AUTO = {"minilm"}
# The data-aware bench's calibration size; the data-aware bench imports `dataset` with it.
CALIB_SAMPLES = 512
STORAGE_FACTORS = (10, 100, 1000)


def dataset(name):
    if name == "efficientnet":
        import efficientnet

        path = Path(tempfile.mkdtemp()) / "efficientnet-lite0.onnx"
        efficientnet.export_efficientnet_lite0(path)
        images = efficientnet.photos()
        # Crops of the same 7 photos: the first 10 views of each calibrate, the other 35 evaluate.
        calib_n = 10 * len(efficientnet.PHOTO_NAMES)
        return path, {"input": images[:calib_n]}, {"input": images[calib_n:]}, "agreement"
    if name == "minilm":
        import minilm

        path = Path(tempfile.mkdtemp()) / "minilm.onnx"
        minilm.export_minilm(path)
        tokens = minilm.tokenize(minilm.SENTENCES)
        calib = {k: v[:32] for k, v in tokens.items()}
        evaluation = {k: v[32:] for k, v in tokens.items()}
        return path, calib, evaluation, "cosine"
    with np.load(ROOT / "models" / "calib.npz") as a:
        calib = {"input": a["input"][:CALIB_SAMPLES], "labels": a["labels"][:CALIB_SAMPLES]}
    with np.load(ROOT / "models" / "eval.npz") as a:
        evaluation = {"input": a["input"], "labels": a["labels"]}
    return ROOT / "models" / f"{name}.onnx", calib, evaluation, "top1"


def metric_of(report, metric):
    return report.metrics[metric]


def matched_plan(layers, method, factor):
    plan = {}
    for layer in layers:
        accepted, _ = applicable_methods(layer, [method])
        if not accepted:
            continue
        rank = METHODS[method].rank_for_params(layer, layer.params / factor)
        if rank is not None:
            plan[layer.name] = (method, rank)
    return plan


def plan_params(layers, plan):
    by_name = {layer.name: layer for layer in layers}
    dense = sum(layer.params for layer in layers if layer.candidate)
    after = dense - sum(
        by_name[n].params - METHODS[m].cost(by_name[n], r).params for n, (m, r) in plan.items()
    )
    return dense / after


def run_plan(path, plan, calib, evaluation):
    return tnopt.compress(str(path), ranks=plan, data=calib, eval_data=evaluation, provider="cpu")


def auto_plan(path, layers, methods, factor, calib, metric):
    """Per layer, the method whose layer-alone rewrite scores best on the calibration data."""
    plan = {}
    for layer in layers:
        best = None
        for method in methods:
            single = matched_plan([layer], method, factor)
            if not single:
                continue
            _, report = tnopt.compress(
                str(path), ranks=single, data=calib, eval_data=calib, provider="cpu", correct=False
            )
            if report.rewritten:
                score = metric_of(report, metric)
                if best is None or score > best[0]:
                    best = (score, single[layer.name])
        if best is not None:
            plan[layer.name] = best[1]
    return plan


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="fc2,lenet5,cnn4,vgg,resnet,minilm")
    p.add_argument("--out")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    rows = [("model", "f", "method", "params x (cand.)", "layers", "eval metric", "original")]
    storage_rows = [("model", "layers", "f", "file x", "params x (those layers)", "eval metric", "original")]
    for name in args.models.split(","):
        path, calib, evaluation, metric = dataset(name)
        layers = [layer for layer in analyze(load_model(str(path))) if layer.candidate]
        methods = [m for m in METHODS if any(applicable_methods(layer, [m])[0] for layer in layers)]
        for factor in FACTORS:
            for method in methods + ([] if name in NO_AUTO else ["auto"]):
                start = time.perf_counter()
                plan = (
                    auto_plan(path, layers, methods, factor, calib, metric)
                    if method == "auto"
                    else matched_plan(layers, method, factor)
                )
                if not plan:
                    continue
                _, report = run_plan(path, plan, calib, evaluation)
                original = report.metrics.get(f"{metric}_original", 1.0)
                label = (
                    method
                    if method != "auto"
                    else "auto: "
                    + ",".join(
                        f"{m}×{sum(1 for v in plan.values() if v[0] == m)}"
                        for m in sorted({v[0] for v in plan.values()})
                    )
                )
                rows.append(
                    (
                        name,
                        f"{factor}x",
                        label,
                        f"{plan_params(layers, plan):.2f}",
                        f"{len(report.rewritten)}/{len(layers)}",
                        f"{metric_of(report, metric):.4f}",
                        f"{original:.4f}",
                    )
                )
                print(format_table(rows[-1:]), f"({time.perf_counter() - start:.0f}s)", flush=True)
        storage_layers = _storage_layers(name, layers)
        for factor in STORAGE_FACTORS if storage_layers else ():
            plan = {}
            for layer in storage_layers:
                rank = METHODS["mpo-storage"].rank_for_params(layer, layer.params / factor)
                if rank is not None:
                    plan[layer.name] = ("mpo-storage", rank)
            _, report = run_plan(path, plan, calib, evaluation)
            original = report.metrics.get(f"{metric}_original", 1.0)
            storage_rows.append(
                (
                    name,
                    _describe(storage_layers),
                    f"{factor}x",
                    f"{report.before.file_bytes / report.after.file_bytes:.2f}",
                    f"{plan_params(storage_layers, plan):.1f}",
                    f"{metric_of(report, metric):.4f}",
                    f"{original:.4f}",
                )
            )
            print(format_table(storage_rows[-1:]), flush=True)
    print("\n" + format_table(rows) + "\n\n" + format_table(storage_rows))
    if args.out:
        append_results(
            args.out,
            "methods.py",
            argv,
            _markdown(rows) + "\n\nMPO storage mode:\n\n" + _markdown(storage_rows),
        )
    return 0


def _storage_layers(name, layers):
    if name == "vgg":
        return [layer for layer in layers if layer.op == "Gemm"]
    if name == "minilm":  # the FFN: the 384→1536 and 1536→384 MatMuls
        return [layer for layer in layers if layer.op == "MatMul" and 1536 in layer.weight_shape]
    return []


def _describe(layers):
    return f"{len(layers)} × " + ", ".join(
        sorted({"x".join(map(str, layer.weight_shape)) for layer in layers})
    )


def append_results(path, script: str, argv, body: str) -> None:
    """Append `body` to the results file under a dated header naming the command that made it."""
    header = (
        f"\n### bench/{script} — {time.strftime('%Y-%m-%d')}\n\n`python bench/{script} "
        f"{' '.join(argv or sys.argv[1:])}` on {platform.node()}, CPU provider.\n\n"
    )
    with open(path, "a") as handle:
        handle.write(header + body + "\n")


def _markdown(rows) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows[1:]])


if __name__ == "__main__":
    sys.exit(main())
