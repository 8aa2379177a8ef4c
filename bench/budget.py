"""Budgeted search vs two peer rank rules, per reference model and budget, in one run.

    python bench/budget.py [--models cnn4,resnet] [--budgets 0.005,0.01,0.02] [--calib 512] [--out FILE]

Same model, same data, same seed for every rule: calibration = the first N samples of
models/calib.npz, evaluation = models/eval.npz (disjoint, 2048 samples). Columns: FLOP and
parameter ratios of the whole model (dense / compressed), top-1 drop on the evaluation split, and
wall-clock compile time. tnopt runs cold (empty cache) for the first budget of each model; later
budgets reuse the sensitivity cache, as a user's second run would (marked "cached").
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import peers  # noqa: E402

import tnopt  # noqa: E402
from tnopt.report import format_table  # noqa: E402

MODELS = ["fc2", "lenet5", "cnn4", "vgg", "resnet"]


def load_splits(calib_n: int):
    with np.load(ROOT / "models" / "calib.npz") as a:
        calib = {"input": a["input"][:calib_n], "labels": a["labels"][:calib_n]}
    with np.load(ROOT / "models" / "eval.npz") as a:
        evaluation = {"input": a["input"], "labels": a["labels"]}
    return calib, evaluation


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # apt-get install -y dataset-fashion-mnist
# models/train_reference.py trains cnn4 on the first 40,000 and vgg / resnet on the first 30,000 images
# of this seeded permutation of the 60,000 training images: the rest were never seen by them.
TRAIN_PERMUTATION_SEED, UNSEEN_FROM = 0, 40_000


def load_unseen_train(n: int):
    """Up to 20,000 Fashion-MNIST training images (with labels) that none of cnn4, vgg, resnet was
    trained on (fc2 and lenet5 saw all 60,000), normalised like models/calib.npz. Disjoint from
    models/eval.npz, which comes from the test set."""
    x, labels = load_train_permuted(slice(UNSEEN_FROM, UNSEEN_FROM + n))
    return {"input": x, "labels": labels}


def load_all_train(n: int = 60_000):
    """The first `n` of all 60,000 Fashion-MNIST training images with labels, in the seeded order of
    `load_train_permuted` (so the images a model trained on come first: cnn4's 40,000, vgg's and
    resnet's 30,000; fc2 and lenet5 saw them all). Disjoint from models/eval.npz (the test set)."""
    x, labels = load_train_permuted(slice(0, n))
    return {"input": x, "labels": labels}


def load_train_permuted(rows: slice = slice(None)):
    """(images (n, 1, 28, 28) float32 normalised like models/calib.npz, labels int64): `rows` of the
    Fashion-MNIST training set in models/train_reference.py's seeded permutation. Only those rows
    are converted to float (all 60,000 would be 188 MB for a 64-image draw)."""
    import gzip

    import torch

    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        raise SystemExit(f"{FASHION_MNIST}: missing; apt-get install -y dataset-fashion-mnist")
    with gzip.open(FASHION_MNIST / "train-images-idx3-ubyte.gz", "rb") as f:
        images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(FASHION_MNIST / "train-labels-idx1-ubyte.gz", "rb") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8).astype(np.int64)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(TRAIN_PERMUTATION_SEED))
    index = order.numpy()[rows]
    x = ((images[index].astype(np.float32) / 255.0 - 0.2860) / 0.3530).astype(np.float32)
    return x, labels[index]


def ratios(report):
    return report.before.flops / report.after.flops, report.before.params / report.after.params


def eval_drop(report):
    return report.metrics["top1_original"] - report.metrics["top1"]


def calib_drop(path, calib, **kwargs):
    """Compress with a fixed rule and measure the top-1 drop on the calibration data."""
    model, report = tnopt.compress(str(path), data=calib, eval_data=calib, provider="cpu", **kwargs)
    return report.metrics["top1_original"] - report.metrics["top1"]


def uniform_bisected(path, calib, evaluation, budget, steps=8):
    """Smallest uniform rank ratio whose calibration drop fits the budget (weight-only factors)."""
    low, high = 0.0, 1.0  # ratio 1.0 keeps every layer dense-equivalent: always within budget
    for _ in range(steps):
        mid = (low + high) / 2
        if calib_drop(path, calib, rank_ratio=mid, data_aware=False, correct=False) <= budget:
            high = mid
        else:
            low = mid
    _, report = tnopt.compress(
        str(path),
        rank_ratio=high,
        data=calib,
        eval_data=evaluation,
        provider="cpu",
        data_aware=False,
        correct=False,
    )
    return report, high


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--budgets", default="0.005,0.01,0.02")
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--out", help="append the table (markdown) to this file")
    p.add_argument(
        "--sensitivity",
        default="",
        help="comma list of tnopt sensitivity modes (predicted, measured): one search row per mode, "
        "each cold in its own cache; default: tnopt's default only",
    )
    p.add_argument("--search-only", action="store_true", help="skip the uniform and VBMF peer rows")
    p.add_argument("--json", help="write each tnopt run's report to DIR/MODEL-BUDGET[-MODE].json")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    budgets = [float(b) for b in args.budgets.split(",")]
    calib, evaluation = load_splits(args.calib)
    rows = [("model", "budget", "rule", "FLOPs x", "params x", "eval drop", "compile s", "note")]
    for name in args.models.split(","):
        path = ROOT / "models" / f"{name}.onnx"
        for mode in [m for m in args.sensitivity.split(",") if m] or [None]:
            options = {} if mode is None else {"sensitivity": mode}
            cache = tempfile.mkdtemp(prefix=f"tnopt-bench-{name}-")
            for index, budget in enumerate(budgets):
                start = time.perf_counter()
                _, report = tnopt.compress(
                    str(path),
                    budget=budget,
                    data=calib,
                    eval_data=evaluation,
                    provider="cpu",
                    cache_dir=cache,
                    **options,
                )
                seconds = time.perf_counter() - start
                flops, params = ratios(report)
                steps = report.search.get("steps", {})
                work = " ".join(
                    f"{k} {v['wall_s']:.0f}s/{v['sample_forwards'] / args.calib:.1f}p"
                    for k, v in steps.items()
                )
                note = ("cold" if index == 0 else "cached") + (
                    "" if report.budget_met else "; MISSED: " + report.search["miss_reason"][:60]
                )
                rows.append(
                    (
                        name,
                        f"{budget:.1%}",
                        "tnopt search" + (f" ({mode})" if mode else ""),
                        f"{flops:.2f}",
                        f"{params:.2f}",
                        f"{eval_drop(report):+.2%}",
                        f"{seconds:.1f}",
                        note + (f"; {work}" if work else ""),
                    )
                )
                print(format_table(rows[-1:]), flush=True)
                if args.json:
                    os.makedirs(args.json, exist_ok=True)
                    suffix = f"-{mode}" if mode else ""
                    report.write_json(os.path.join(args.json, f"{name}-{budget:g}{suffix}.json"))
        for budget in [] if args.search_only else budgets:
            start = time.perf_counter()
            report, ratio = uniform_bisected(path, calib, evaluation, budget)
            seconds = time.perf_counter() - start
            flops, params = ratios(report)
            rows.append(
                (
                    name,
                    f"{budget:.1%}",
                    "uniform ratio (bisected)",
                    f"{flops:.2f}",
                    f"{params:.2f}",
                    f"{eval_drop(report):+.2%}",
                    f"{seconds:.1f}",
                    f"ratio {ratio:.3f}",
                )
            )
            print(format_table(rows[-1:]), flush=True)
        if args.search_only:
            continue
        start = time.perf_counter()
        ranks = peers.vbmf_ranks(path)
        _, report = tnopt.compress(
            str(path),
            ranks=ranks,
            data=calib,
            eval_data=evaluation,
            provider="cpu",
            data_aware=False,
            correct=False,
        )
        seconds = time.perf_counter() - start
        flops, params = ratios(report)
        rows.append(
            (
                name,
                "-",
                "VBMF ranks (weight-only)",
                f"{flops:.2f}",
                f"{params:.2f}",
                f"{eval_drop(report):+.2%}",
                f"{seconds:.1f}",
                "no budget control",
            )
        )
        print(format_table(rows[-1:]), flush=True)
    table = format_table(rows)
    print("\n" + table)
    if args.out:
        md = markdown(rows)
        header = (
            f"\n### bench/budget.py — {time.strftime('%Y-%m-%d')}\n\n`python bench/budget.py "
            f"{' '.join(argv or sys.argv[1:])}` on {platform.node() or 'this machine'}: "
            f"{os.cpu_count()} CPU cores, {platform.python_version()}, onnxruntime CPU provider, "
            f"{args.calib} calibration samples, 2048 evaluation samples.\n\n"
        )
        with open(args.out, "a") as handle:
            handle.write(header + md + "\n")
    return 0


def markdown(rows) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows[1:]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
