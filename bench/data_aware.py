"""Weight-only vs whitened vs whitened + sequential correction, under the same budgeted search.

    python bench/data_aware.py [--models fc2,lenet5,cnn4,vgg,resnet,minilm] [--budgets 0.005,0.01,0.02]
                               [--memory] [--out bench/RESULTS.md]

Per model and budget, the search runs three times on the same data and seed, changing only how
factors are fitted; the table gives the FLOP and parameter ratios (dense / compressed, whole model),
the FLOPs removed relative to weight-only, and the drop on the evaluation split. Reference models:
top-1 on models/eval.npz (calibration: first 512 of models/calib.npz). MiniLM: cosine similarity
of the sentence embeddings to the original's: 96 calibration sentences (32 of models/minilm.py's
SENTENCES + 64 from the Python reference manual shipped with the interpreter), 96 other ones to
evaluate (32 + 64); on 32 sentences alone whitened factors certified a 1% budget that 32 others
missed by 18 points. The manual is the running interpreter's own, so the sentences follow its version.
EfficientNet-Lite0: top-1 agreement with the original on crops of the 7 photos shipped with
scikit-image (70 calibration crops, 245 evaluation crops of other views; layers ≥ 100k params).
`--memory` measures the peak RSS that collecting ResNet statistics over 2048 samples adds.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from methods import _markdown, append_results, dataset  # noqa: E402

import tnopt  # noqa: E402
from tnopt.report import format_table  # noqa: E402

# EfficientNet-Lite0 has 34 candidate layers at 224x224 on 2 cores: the search takes its 11 largest
# (84% of the candidate FLOPs) and leaves the rest dense, with that reason in the report.
# MiniLM: all 36 weight MatMuls, SVD only: the three modes differ in how SVD factors are fitted (MPO
# has no whitened form, lost most of the cosine at 2x in bench/methods.py, and its sweep cannot run
# on the search's switchboard, so `auto` would spend most of the time on MPO exports).
EXTRA = {"efficientnet": {"min_layer_params": 100_000}, "minilm": {"methods": "svd"}}
MODES = {
    "weight-only": dict(data_aware=False, correct=False),
    "whitened": dict(data_aware=True, correct=False),
    "whitened+correction": dict(data_aware=True, correct=True),
}


def memory_probe() -> int:
    """Child process: peak RSS added by collect_stats on ResNet over 2048 samples (printed, KiB)."""
    import numpy as np

    from tnopt.analyze import analyze
    from tnopt.io import load_model
    from tnopt.profile import collect_stats
    from tnopt.runtime import Runtime

    with np.load(ROOT / "models" / "calib.npz") as a, np.load(ROOT / "models" / "eval.npz") as b:
        inputs = {"input": np.concatenate([a["input"], b["input"]])[:2048]}
    model = load_model(str(ROOT / "models" / "resnet.onnx"))
    layers = [layer for layer in analyze(model) if layer.candidate]
    runtime = Runtime("cpu")
    runtime.run(model, {"input": inputs["input"][:256]})  # the model itself, loaded and run once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    stats = collect_stats(model, layers, inputs, runtime, want_patches=True)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"MEMORY {len(stats)} {after - before} {time.perf_counter() - start:.1f} {before} {after}")
    return 0


def minilm_dataset():
    import minilm

    path = Path(tempfile.mkdtemp()) / "minilm.onnx"
    minilm.export_minilm(path)
    manual = minilm.reference_manual_sentences(128)
    calib = minilm.tokenize(minilm.SENTENCES[:32] + manual[:64])
    evaluation = minilm.tokenize(minilm.SENTENCES[32:] + manual[64:])
    return path, calib, evaluation, "cosine"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="fc2,lenet5,cnn4,vgg,resnet,minilm")
    p.add_argument("--budgets", default="0.005,0.01,0.02")
    p.add_argument("--memory", action="store_true")
    p.add_argument("--ratios", help="instead of budgets: fixed rank ratios, e.g. 0.5,0.25 (no search)")
    p.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.memory_probe:
        return memory_probe()
    warnings.simplefilter("ignore")
    rows = [
        (
            "model",
            "budget",
            "factors",
            "FLOPs x",
            "params x",
            "FLOPs removed vs weight-only",
            "eval drop",
            "compile s",
        )
    ]
    for name in [m for m in args.models.split(",") if m]:
        path, calib, evaluation, metric = minilm_dataset() if name == "minilm" else dataset(name)
        cache = tempfile.mkdtemp(prefix=f"tnopt-da-{name}-")
        rules = (
            [("ratio", float(r)) for r in args.ratios.split(",")]
            if args.ratios
            else [("budget", float(b)) for b in args.budgets.split(",")]
        )
        for kind, budget in rules:
            removed_weight_only = None
            for mode, flags in MODES.items():
                start = time.perf_counter()
                rule = {"budget": budget} if kind == "budget" else {"rank_ratio": budget, "methods": "svd"}
                _, report = tnopt.compress(
                    str(path),
                    **rule,
                    data=calib,
                    eval_data=evaluation,
                    metric=metric,
                    provider="cpu",
                    cache_dir=cache,
                    **flags,
                    **EXTRA.get(name, {}),
                )
                seconds = time.perf_counter() - start
                removed = report.before.flops - report.after.flops
                removed_weight_only = removed if removed_weight_only is None else removed_weight_only
                relative = (
                    f"{removed / removed_weight_only:.2f}x"
                    if removed_weight_only
                    else ("n/a (weight-only removed 0)" if removed else "-")
                )
                if kind == "ratio":  # fixed ranks: the same compression, compare the metric instead
                    value = report.metrics[metric] if metric in report.metrics else report.metrics["top1"]
                    rows.append(
                        (
                            name,
                            f"ratio {budget:g}",
                            mode,
                            f"{report.before.flops / report.after.flops:.2f}",
                            f"{report.before.params / report.after.params:.2f}",
                            "-",
                            f"{metric} {value:.4f}",
                            f"{time.perf_counter() - start:.0f}",
                        )
                    )
                    print(format_table(rows[-1:]), flush=True)
                    continue
                drop = report.budget["drop_evaluation"]
                rows.append(
                    (
                        name,
                        f"{budget:.1%}",
                        mode,
                        f"{report.before.flops / report.after.flops:.2f}",
                        f"{report.before.params / report.after.params:.2f}",
                        relative,
                        "n/a" if drop is None else f"{drop:+.2%}",
                        f"{seconds:.0f}",
                    )
                )
                print(format_table(rows[-1:]), flush=True)
    memory_line = ""
    if args.memory:
        out = subprocess.run(
            [sys.executable, __file__, "--memory-probe"], capture_output=True, text=True, check=True
        )
        line = next(line for line in out.stdout.splitlines() if line.startswith("MEMORY"))
        _, layers, kib, seconds, before, after = line.split()
        memory_line = (
            f"Statistics for ResNet-style ({layers} layers, channel and patch moments) over 2048 "
            f"samples: peak RSS {int(after) / 1024:.0f} MiB, against {int(before) / 1024:.0f} MiB after "
            "loading "
            f"the model and running it once on 256 samples (+{int(kib) / 1024:.0f} MiB), {seconds} s."
        )
        print(memory_line)
    print("\n" + format_table(rows))
    if args.out:
        append_results(
            args.out, "data_aware.py", argv, _markdown(rows) + ("\n\n" + memory_line if memory_line else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
