"""Healing benchmark: the budgeted search without and with `--heal`, side by side, and deep-TN storage.

    python bench/heal.py [--models vgg,resnet,minilm,efficientnet] [--budgets 0.005,0.01,0.02] [--steps 200]
                         [--calib 8192] [--sentences 768] [--crops 512] [--eval-crops 256]
                         [--heal-time 1080] [--deep-tn fc2,vgg] [--deep-tn-steps 1500] [--out FILE]

Budget rows: same model, data and seed for both columns. vgg / resnet: calibration = N Fashion-MNIST
training images that cnn4/vgg/resnet never trained on (`--calib-source train`, the default;
`committed` takes models/calib.npz) **without labels** (label-free: the budget is charged in top-1
agreement with the original); evaluation = models/eval.npz (2048 test images, disjoint; its labels
only report top-1). minilm / efficientnet: data split by source, not by sample (bench/heal_tasks.py):
MiniLM calibrates on sentences of one document and is evaluated on sentences of others, with the
budget charged on the mean per-sentence cosine of its pooled embeddings (`metric="cosine"`);
EfficientNet-Lite0 calibrates on crops of some skimage.data photos and is evaluated on crops of the
other photos, the budget in the default metric (top-1 agreement with the original). FLOPs ×: the
report's ratio over the candidate layers (Conv / Gemm / constant-weight MatMul: MiniLM's 36 weight
MatMuls); whole-model FLOPs ×: every MatMul / Gemm / Conv of the graph (attention products too) at
each evaluation sample's own shape (a sentence's unpadded token count), averaged.
The healed run keeps 25% of the calibration images out of everything that fits (held-out gate) and
1/8 of the rest out of training (checkpoint selection). Columns:
whole-model FLOP and parameter ratios (dense / compressed), the agreement drop on the evaluation
split, compile(+heal) wall time, heal sample-steps (Σ batch size over all optimizer steps, all plans
the heal-aware budget tried) and the calibration samples used.

Deep-TN rows: every Conv/Gemm/MatMul of ≥ 50k parameters stored as `--deep-tn-method`
(`tt-storage-mixed`, the gateless network on mixed-radix sites for axes > 4 and binary ones for
smaller axes, by default; `tt-storage` on binary sites; `deep-tn-storage` with gate layers) at the
largest bond whose cores and gates are ≤ 1/R of the layer (R each of `--deep-tn-ratios`, default
100; `--deep-tn-share output-rank` instead shares the model's total 1/R by the effective rank of
each layer's output × its fan-in + fan-out), then healed on `--deep-tn-calib` labelled training
images (labels used: this table is about storage, not label-free compression; `--deep-tn-augment`
heals on randomly flipped / shifted views, the teacher on the same view); top-1 on the evaluation
split and on the images healed on, and the ONNX file size. The images (`--deep-tn-images`): all
60,000 labelled Fashion-MNIST training images by default (fc2 trained on all of them, vgg/resnet on
the first 30,000 of this order), or only those vgg/resnet/cnn4 never saw (`unseen`, up to 20,000);
`--deep-tn-holdout` of them (5%) are kept for the gate, 1/8 of the rest pick the checkpoint. At
≥ 100x the healed TT underfits the images it is healed on (bench/RESULTS.md, issue 11 sessions
12–13): 60,000 images instead of 10,752 lifted fc2 by a point at the same steps, where the 10,752
were fitted to the original's level and the evaluation split was not (overfit).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import budget as budget_bench  # noqa: E402
import heal_tasks  # noqa: E402
from tnopt.passes import METHODS  # noqa: E402

import tnopt  # noqa: E402
from tnopt.analyze import analyze  # noqa: E402
from tnopt.heal import HealConfig, parse_augment  # noqa: E402
from tnopt.runtime import Runtime  # noqa: E402


def load_splits(calib_n: int, source: str = "train"):
    """Calibration (without labels: label-free), the same images with labels (deep-TN rows), and the
    evaluation split (models/eval.npz, 2048 Fashion-MNIST test images). source "train": training
    images none of cnn4/vgg/resnet saw (bench/budget.py's load_unseen_train, up to 20,000);
    "committed": models/calib.npz (1024 test images)."""
    labelled, evaluation = budget_bench.load_splits(calib_n)
    if source == "train":
        labelled = budget_bench.load_unseen_train(calib_n)
    return {"input": labelled["input"]}, labelled, evaluation


def task(name: str, args):
    """(model path, calibration data, evaluation data, metric or None for the default, data note)."""
    if name == "minilm":
        path, calib, evaluation, note = heal_tasks.minilm_task(args.sentences, args.calib_text == "pool")
        return path, calib, evaluation, "cosine", note
    if name == "efficientnet":
        path, calib, evaluation, note = heal_tasks.efficientnet_task(args.crops, args.eval_crops)
        return path, calib, evaluation, None, note
    calib, _, evaluation = load_splits(args.calib, args.calib_source)
    source = "training images unseen by the model" if args.calib_source == "train" else "models/calib.npz"
    note = (
        f"calibration: {len(calib['input'])} Fashion-MNIST {source} (no labels); "
        "evaluation: models/eval.npz (2048 test images)"
    )
    return ROOT / "models" / f"{name}.onnx", calib, evaluation, None, note


def heal_sample_steps(report) -> int:
    return int(sum((p.get("heal") or {}).get("sample_steps", 0) for p in report.heal.get("plans", [])))


def budget_row(name, budget, report, seconds, healed: bool, calib_n: int, whole=None) -> dict:
    row = {
        "model": name,
        "budget": budget,
        "metric": (report.budget or {}).get("metric"),
        "heal": healed,
        "flops_ratio": report.before.flops / report.after.flops,
        "whole_flops_ratio": whole,
        "params_ratio": report.before.params / report.after.params,
        "rewritten": len(report.rewritten),
        "drop_eval": report.budget.get("drop_evaluation"),
        "top1_drop_eval": (
            report.metrics["top1_original"] - report.metrics["top1"] if "top1" in report.metrics else None
        ),
        "budget_met": report.budget_met,
        "seconds": seconds,
        "sample_steps": heal_sample_steps(report) if healed else 0,
        "calib": calib_n,
    }
    if healed:
        row["looseness"] = report.heal.get("chosen_looseness")
        row["flops_before"] = report.before.flops
        row["plans"] = [
            {
                k: p.get(k)
                for k in (
                    "looseness",
                    "saving",
                    "drop_before",
                    "drop_after",
                    "margin",
                    "passed",
                    "seconds",
                    "drop_evaluation_before",
                    "drop_evaluation_after",
                )
            }
            for p in report.heal.get("plans", [])
        ]
        first = next((p["heal"] for p in report.heal.get("plans", []) if p.get("heal")), {})
        row["heal_path"] = first.get("path")
        row["heal_path_reason"] = first.get("reason")
        row["heal_skipped"] = first.get("skipped")
        row["train_samples"], row["select_samples"], row["holdout_samples"] = (
            first.get("train_samples"),
            first.get("select_samples"),
            first.get("holdout_samples"),
        )
    return row


def deep_tn_rows(
    name,
    labelled,
    evaluation,
    healing: HealConfig,
    cache,
    method_name="tt-storage",
    ratios=(100.0,),
    share="layer",
) -> list[dict]:
    path = ROOT / "models" / f"{name}.onnx"
    method = METHODS[method_name]
    original = tnopt.io.load_model(str(path))
    layers = [x for x in analyze(original) if x.candidate and x.params >= 50_000]
    by_name = {layer.name: layer for layer in layers}
    outputs = None
    if share == "output-rank":
        sample = {"input": labelled["input"][:512]}
        outputs = Runtime("cpu").capture(original, [x.output_name for x in layers], sample)
        outputs = {x.name: outputs[x.output_name] for x in layers}
    rows = []
    for ratio in ratios:
        rows += _deep_tn_pair(
            name, path, method, layers, by_name, outputs, ratio, labelled, evaluation, healing, cache, share
        )
    return rows


def _deep_tn_pair(
    name, path, method, layers, by_name, outputs, ratio, labelled, evaluation, healing, cache, share
) -> list[dict]:
    method_name = method.name
    original_model = tnopt.io.load_model(str(path))
    total = sum(x.params for x in layers) / ratio
    if share == "layer":
        chis = {x.name: method.rank_for_params(x, x.params / ratio) for x in layers}
    else:
        chis = method.shared_ranks(layers, outputs, total)
    ranks = {n: (method_name, chi) for n, chi in chis.items() if chi is not None}
    rows = []
    for heal in (None, healing):
        started = time.perf_counter()
        model, report = tnopt.compress(
            str(path),
            ranks=ranks,
            methods=method_name,
            data=labelled,
            eval_data=evaluation,
            provider="cpu",
            heal=heal,
            cache_dir=cache,
            correct=False,
        )
        seconds = time.perf_counter() - started
        # Top-1 on the images healed on (the first train_samples rows: the selection split and the
        # gate's holdout come after them) beside the evaluation split's: underfit or overfit.
        fitted = (report.heal["plans"][0]["heal"] or {}).get("train_samples") if heal else None
        train_top1 = None if not fitted else [top1(m, labelled, fitted) for m in (model, original_model)]
        stored = sum(e.params_after for e in report.layers if e.decision == "rewritten")
        dense = sum(e.params_before for e in report.layers if e.decision == "rewritten")
        rows.append(
            {
                "model": name,
                "method": method_name,
                "share": share,
                "ratio_target": ratio,
                "heal": heal is not None,
                "layers": ", ".join(
                    f"{n} {'×'.join(map(str, method.layout(by_name[n]).axes))} χ={method.rank_label(r[1])}"
                    for n, r in ranks.items()
                ),
                "dense_params": dense,
                "stored_params": stored,
                "top1_original": report.metrics["top1_original"],
                "top1": report.metrics["top1"],
                "top1_train": None if train_top1 is None else train_top1[0],
                "top1_train_original": None if train_top1 is None else train_top1[1],
                "train_samples": fitted,
                "file_before": report.before.file_bytes,
                "file_after": len(model.SerializeToString()),
                "seconds": seconds,
                "sample_steps": heal_sample_steps(report) if heal else 0,
                "calib": len(labelled["input"]),
                "healing": None if heal is None else healing_note(heal),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def top1(model, labelled, count: int) -> float:
    """Top-1 of `model` on the first `count` labelled images, in onnxruntime."""
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    images, labels = labelled["input"][:count], labelled["labels"][:count]
    guesses = [session.run(None, {name: images[i : i + 512]})[0].argmax(1) for i in range(0, count, 512)]
    return float((np.concatenate(guesses) == labels).mean())


def healing_note(config: HealConfig) -> str:
    """How a deep-TN row was healed: steps, and whatever differs from HealConfig's defaults."""
    parts = [f"{config.steps} steps"]
    if config.augment:
        parts.append("augment " + "+".join(config.augment))
    if config.label_weight != HealConfig.label_weight:
        parts.append(f"CE weight {config.label_weight:g}")
    if config.temperature != HealConfig.temperature:
        parts.append(f"T={config.temperature:g}")
    if config.seed != HealConfig.seed:
        parts.append(f"seed {config.seed}")
    return ", ".join(parts)


def progress(started: float):
    """The run's progress lines, timed, on stdout (the bench log: where the time went)."""

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", flush=True)

    return log


def markdown(rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows[1:]])


def _drop(value) -> str:
    return "–" if value is None else f"{value:.4f}"


def budget_table(rows) -> str:
    out = [
        (
            "model",
            "budget (metric)",
            "heal",
            "FLOPs × (candidate layers)",
            "FLOPs × (whole model)",
            "params ×",
            "rewritten",
            "drop (eval)",
            "top-1 drop (eval)",
            "met",
            "compile+heal s",
            "heal sample-steps",
            "samples (calib/heal train/select/gate)",
        )
    ]
    for r in rows:
        samples = f"{r['calib']}" + (
            f"/{r['train_samples']}/{r['select_samples']}/{r['holdout_samples']}" if r["heal"] else ""
        )
        out.append(
            (
                r["model"],
                f"{r['budget']:.1%} ({r['metric']})",
                "yes" if r["heal"] else "no",
                f"{r['flops_ratio']:.2f}",
                "" if r["whole_flops_ratio"] is None else f"{r['whole_flops_ratio']:.2f}",
                f"{r['params_ratio']:.2f}",
                r["rewritten"],
                "" if r["drop_eval"] is None else f"{r['drop_eval']:.4f}",
                "" if r["top1_drop_eval"] is None else f"{r['top1_drop_eval']:.4f}",
                r["budget_met"],
                f"{r['seconds']:.0f}",
                r["sample_steps"],
                samples,
            )
        )
    return markdown(out)


def deep_tn_table(rows) -> str:
    out = [
        (
            "model",
            "method",
            "heal",
            "layers (axes, bond χ)",
            "dense params",
            "stored params",
            "×",
            "top-1 orig",
            "top-1",
            "top-1 on the images healed on (orig)",
            "file bytes before → after",
            "s",
            "sample-steps",
        )
    ]
    for r in rows:
        out.append(
            (
                r["model"],
                r.get("method", "deep-tn-storage"),
                (r.get("healing") or "yes") if r["heal"] else "no (TT-SVD init)",
                r["layers"],
                f"{r['dense_params']:,}",
                f"{r['stored_params']:,}",
                f"{r['dense_params'] / r['stored_params']:.0f}",
                f"{r['top1_original']:.4f}",
                f"{r['top1']:.4f}",
                "–"
                if r.get("top1_train") is None
                else f"{r['top1_train']:.4f} ({r['top1_train_original']:.4f}, {r['train_samples']:,})",
                f"{r['file_before']:,} → {r['file_after']:,}",
                f"{r['seconds']:.0f}",
                r["sample_steps"],
            )
        )
    return markdown(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="vgg,resnet")
    p.add_argument("--budgets", default="0.005,0.01,0.02")
    p.add_argument("--steps", type=int, default=200, help="heal steps per plan (of --heal-batch samples)")
    p.add_argument(
        "--heal-time", type=float, default=1080, help="seconds for the heal-aware search per model and budget"
    )
    p.add_argument("--calib", type=int, default=8192, help="calibration + healing images (≤ 8192)")
    p.add_argument("--calib-source", choices=("train", "committed"), default="train")
    p.add_argument(
        "--sentences", type=int, default=768, help="MiniLM calibration sentences (≤ 777 from the reference)"
    )
    p.add_argument(
        "--calib-text",
        choices=("reference", "pool"),
        default="reference",
        help="MiniLM calibration text: the Python Language Reference, or a pool of several documents",
    )
    p.add_argument("--rows", default="plain,healed", help="which budget rows: plain (no heal), healed")
    p.add_argument("--crops", type=int, default=512, help="EfficientNet calibration crops")
    p.add_argument("--eval-crops", type=int, default=256, help="EfficientNet evaluation crops")
    p.add_argument("--heal-batch", type=int, default=64, help="samples per heal step")
    p.add_argument(
        "--heal-augment",
        default="",
        help="heal the budget rows on augmented views (flip,crop,mixup); the teacher sees the same view",
    )
    p.add_argument(
        "--heal-lr", type=float, default=HealConfig.lr, help="Adam step relative to each tensor's RMS"
    )
    p.add_argument("--deep-tn", default="fc2,vgg")
    p.add_argument("--deep-tn-steps", type=int, default=1500)
    p.add_argument("--deep-tn-batch", type=int, default=128)
    p.add_argument("--deep-tn-lr", type=float, default=0.03, help="Adam step relative to each tensor's RMS")
    p.add_argument(
        "--deep-tn-method",
        default="tt-storage-mixed",
        choices=("tt-storage", "tt-storage-mixed", "deep-tn-storage"),
        help="depth 0 on binary sites, depth 0 on mixed-radix sites (binary on axes <= 4), or with gate "
        "layers",
    )
    p.add_argument(
        "--deep-tn-share",
        default="layer",
        choices=("output-rank", "layer"),
        help="how the 1/ratio budget is spread over a model's >= 50k layers: shared by the effective rank "
        "of each layer's output x its fan-in + fan-out (output-rank), or 1/ratio of each layer on its own",
    )
    p.add_argument(
        "--deep-tn-ratios",
        default="100",
        help="dense / stored parameters of the >= 50k layers together; several (100,50,25) give a trade-off",
    )
    p.add_argument(
        "--deep-tn-calib",
        type=int,
        default=60_000,
        help="labelled training images for the deep-TN rows (at most 20,000 with --deep-tn-images unseen)",
    )
    p.add_argument(
        "--deep-tn-images",
        choices=("unseen", "all"),
        default="all",
        help="the deep-TN rows' images: training images vgg/resnet/cnn4 never saw (up to 20,000), or the "
        "first --deep-tn-calib of all 60,000 training images (those a model trained on included)",
    )
    p.add_argument(
        "--deep-tn-holdout",
        type=float,
        default=0.05,
        help="fraction of the deep-TN images kept for the gate (not trained on, not used by the rows)",
    )
    p.add_argument(
        "--deep-tn-augment",
        default="",
        help="heal the deep-TN rows on randomly flipped / shifted views (flip,crop); the teacher sees the "
        "same view as the student",
    )
    p.add_argument(
        "--deep-tn-label-weight",
        type=float,
        default=HealConfig.label_weight,
        help="weight of the cross-entropy on labels",
    )
    p.add_argument(
        "--deep-tn-temperature", type=float, default=HealConfig.temperature, help="of the softmax KL"
    )
    p.add_argument("--deep-tn-seed", type=int, default=0, help="healing seed (batch order, augmentation)")
    p.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    p.add_argument("--json", default=None, help="also write the rows here as they come")
    args = p.parse_args(argv)
    try:
        heal_augment = parse_augment(args.heal_augment)
    except tnopt.errors.TnoptError as exc:
        p.error(str(exc))
    warnings.simplefilter("ignore")
    cache = tempfile.mkdtemp(prefix="tnopt-heal-bench-")
    load = os.getloadavg()
    rows, tn_rows, notes = [], [], []

    def dump():
        if args.json:
            Path(args.json).write_text(
                json.dumps({"budget": rows, "deep_tn": tn_rows}, indent=1, default=str)
            )

    for name in [m for m in args.models.split(",") if m]:
        path, calib, evaluation, metric, note = task(name, args)
        notes.append(f"- {name}: {note}.")
        print(notes[-1], flush=True)
        original = tnopt.io.load_model(str(path))
        shapes = heal_tasks.per_sample_shapes(evaluation)
        dense_flops = heal_tasks.mean_flops(original, shapes)
        for budget in [float(b) for b in args.budgets.split(",") if b]:
            healing = HealConfig(
                steps=args.steps,
                batch_size=args.heal_batch,
                lr=args.heal_lr,
                augment=heal_augment,
                eval_every=25,
                patience=4,
                time_budget_s=args.heal_time,
            )
            wanted = args.rows.split(",")
            for heal in [h for h, row in ((None, "plain"), (healing, "healed")) if row in wanted]:
                started = time.perf_counter()
                compressed, report = tnopt.compress(
                    str(path),
                    budget=budget,
                    data=calib,
                    eval_data=evaluation,
                    metric=metric,
                    provider="cpu",
                    cache_dir=cache,
                    seed=0,
                    heal=heal,
                    log=progress(started),
                )
                seconds = time.perf_counter() - started
                whole = dense_flops / heal_tasks.mean_flops(compressed, shapes)
                del compressed
                rows.append(
                    budget_row(
                        name,
                        budget,
                        report,
                        seconds,
                        heal is not None,
                        len(next(iter(calib.values()))),
                        whole,
                    )
                )
                print(json.dumps(rows[-1], default=str), flush=True)
                dump()
    tn_healing = HealConfig(
        steps=args.deep_tn_steps,
        batch_size=args.deep_tn_batch,
        lr=args.deep_tn_lr,
        eval_every=max(25, args.deep_tn_steps // 20),
        patience=6,
        max_samples=args.deep_tn_calib,
        holdout=args.deep_tn_holdout,
        augment=parse_augment(args.deep_tn_augment),
        label_weight=args.deep_tn_label_weight,
        temperature=args.deep_tn_temperature,
        seed=args.deep_tn_seed,
    )
    for name in [m for m in args.deep_tn.split(",") if m]:
        _, tn_labelled, tn_evaluation = load_splits(args.deep_tn_calib, args.calib_source)
        if args.deep_tn_images == "all":
            tn_labelled = budget_bench.load_all_train(args.deep_tn_calib)
        tn_rows += deep_tn_rows(
            name,
            tn_labelled,
            tn_evaluation,
            tn_healing,
            cache,
            args.deep_tn_method,
            [float(r) for r in args.deep_tn_ratios.split(",") if r],
            args.deep_tn_share,
        )
        dump()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    body = [
        f"Commit {commit.stdout.strip()}; `uptime` load at start {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, "
        f"at end {os.getloadavg()[0]:.1f} (2 cores shared with other jobs).",
        "",
    ]
    if rows:
        body += [
            "Budgeted search without and with healing (label-free calibration):",
            "",
            *notes,
            "",
            budget_table(rows),
            "",
        ]
        for r in rows:
            if r["heal"]:
                body.append(
                    f"- {r['model']} {r['budget']:.1%}: plans tried (proxy budget ×, held-out drop "
                    "before → after healing, gate; evaluation drop before → after): "
                    + "; ".join(
                        f"×{p['looseness']:g} {r['flops_before'] / (r['flops_before'] - p['saving']):.2f}x "
                        f"{p['drop_before']:.4f}→{p['drop_after']:.4f} "
                        f"{'pass' if p['passed'] else 'fail'} ({p['seconds']:.0f} s; evaluation "
                        f"{_drop(p.get('drop_evaluation_before'))}→{_drop(p.get('drop_evaluation_after'))})"
                        for p in r["plans"]
                    )
                    + f"; heal path: {r.get('heal_path')}"
                    + (f" ({r['heal_path_reason']})" if r.get("heal_path_reason") else "")
                    + (f"; layers not trained: {r['heal_skipped']}" if r.get("heal_skipped") else "")
                )
        body.append("")
    if tn_rows:
        body += ["Deep tensor-network storage of the ≥ 50k-parameter layers:", "", deep_tn_table(tn_rows), ""]
    text = "\n".join(body)
    print(text)
    header = (
        f"\n### bench/heal.py — {time.strftime('%Y-%m-%d')}\n\n`python bench/heal.py "
        f"{' '.join(argv or sys.argv[1:])}`, CPU provider.\n\n"
    )
    with open(args.out, "a") as handle:
        handle.write(header + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
