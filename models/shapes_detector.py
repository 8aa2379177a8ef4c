#!/usr/bin/env python3
"""A small synthetic detector with a YOLO-style output, trained here on coloured shapes.

Usage:
    python models/shapes_detector.py [--steps N] [--threads T]     # train, export, evaluate
    python models/shapes_detector.py --eval-only                   # evaluate the committed ONNX

Images: 64x64 RGB, textured backgrounds (low-frequency colour noise + stripes + pixel noise) with 1-5
non-overlapping shapes of 4 classes (0 ellipse, 1 rectangle, 2 triangle, 3 cross), widths and heights
10..26 px.  Everything is generated from a seed: `make_data(n, seed)` is the one source of training,
calibration and held-out images (the held-out set is seed 1000, never seen in training).

Model: a CenterNet-style fully convolutional net at stride 4 (16x16 = 256 anchor cells), exported to ONNX
with the decode inside the graph so that the output is exactly a YOLOv8-style tensor

    output "output0" float32 [N, 4 + C, A] = [N, 8, 256]
        rows 0..3: box centre x, centre y, width, height in pixels (input image coordinates)
        rows 4..7: class scores in 0..1 (sigmoid of the per-class centre heatmap)

Post-processing (not in the graph, as for YOLOv8): confidence threshold 0.25, per-class NMS at IoU 0.5.
The box rows are ~30-60x larger than the score rows, which is what makes whole-output cosine blind.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ONNX_PATH = os.path.join(HERE, "shapes_detector.onnx")
IMG = 64
STRIDE = 4
GRID = IMG // STRIDE
NUM_CLASSES = 4
CLASS_NAMES = ("ellipse", "rectangle", "triangle", "cross")
HELD_OUT_SEED = 1000
CALIB_SEED = 2000
EVAL_SEED = 3000
BOX_SCALE = 16.0  # width = exp(t) * BOX_SCALE


# --------------------------------------------------------------------------- data
def _background(rng: np.random.Generator) -> np.ndarray:
    base = rng.uniform(0.1, 0.9, size=(3, 1, 1))
    coarse = rng.normal(0.0, 0.12, size=(3, 5, 5))
    # bilinear upsampling of the coarse grid: separable interpolation matrices
    pos = np.linspace(0, 4, IMG)
    lo = np.clip(np.floor(pos).astype(int), 0, 3)
    frac = pos - lo
    interp = np.zeros((IMG, 5))
    interp[np.arange(IMG), lo] = 1 - frac
    interp[np.arange(IMG), lo + 1] += frac
    smooth = np.einsum("yi,cij,xj->cyx", interp, coarse, interp)
    yy, xx = np.mgrid[0:IMG, 0:IMG]
    freq = rng.uniform(0.15, 0.6)
    angle = rng.uniform(0, np.pi)
    stripes = 0.08 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 6.3))
    img = base + smooth + stripes[None] * rng.uniform(0.3, 1.0, size=(3, 1, 1))
    return img, base.ravel()


def _shape_mask(cls: int, cx: float, cy: float, w: float, h: float) -> np.ndarray:
    yy, xx = np.mgrid[0:IMG, 0:IMG] + 0.5
    u = (xx - cx) / (w / 2)
    v = (yy - cy) / (h / 2)
    if cls == 0:  # ellipse
        return u * u + v * v <= 1.0
    if cls == 1:  # rectangle
        return (np.abs(u) <= 1) & (np.abs(v) <= 1)
    if cls == 2:  # triangle, apex up: |u| <= (v + 1) / 2
        return (v >= -1) & (v <= 1) & (np.abs(u) <= (v + 1) / 2)
    # cross: two bars of a third of the width/height
    return ((np.abs(u) <= 1) & (np.abs(v) <= 1 / 3)) | ((np.abs(v) <= 1) & (np.abs(u) <= 1 / 3))


def _iou_xyxy(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def make_image(rng: np.random.Generator):
    """One image [3, 64, 64] in 0..1 and its objects as rows (class, cx, cy, w, h) in pixels."""
    img, base = _background(rng)
    objects = []
    boxes = []
    for _ in range(int(rng.integers(1, 6))):
        for _attempt in range(20):
            w, h = rng.uniform(10, 26, size=2)
            cx = rng.uniform(w / 2 + 1, IMG - w / 2 - 1)
            cy = rng.uniform(h / 2 + 1, IMG - h / 2 - 1)
            box = np.array([cx - w / 2 - 2, cy - h / 2 - 2, cx + w / 2 + 2, cy + h / 2 + 2])
            if all(_iou_xyxy(box, other) == 0.0 for other in boxes):
                break
        else:
            continue
        cls = int(rng.integers(0, NUM_CLASSES))
        colour = rng.uniform(0, 1, size=3)
        while np.abs(colour - base).sum() < 0.8:
            colour = rng.uniform(0, 1, size=3)
        mask = _shape_mask(cls, cx, cy, w, h)
        img[:, mask] = colour[:, None] + rng.normal(0, 0.03, size=(3, 1))
        boxes.append(box)
        objects.append((cls, cx, cy, w, h))
    img = img + rng.normal(0, 0.03, size=img.shape)
    return np.clip(img, 0, 1).astype(np.float32), np.array(objects, dtype=np.float32).reshape(-1, 5)


def make_data(n: int, seed: int):
    """n images [n, 3, 64, 64] float32 in 0..1 and a list of n object arrays (class, cx, cy, w, h)."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, 3, IMG, IMG), np.float32)
    objects = []
    for i in range(n):
        images[i], objs = make_image(rng)
        objects.append(objs)
    return images, objects


def make_targets(objects_list):
    """CenterNet targets on the 16x16 grid: class heatmaps, box targets and their weights."""
    n = len(objects_list)
    heat = np.zeros((n, NUM_CLASSES, GRID, GRID), np.float32)
    box = np.zeros((n, 4, GRID, GRID), np.float32)
    weight = np.zeros((n, 1, GRID, GRID), np.float32)
    gy, gx = np.mgrid[0:GRID, 0:GRID] + 0.5
    for i, objects in enumerate(objects_list):
        for cls, cx, cy, w, h in objects:
            ccx, ccy = cx / STRIDE, cy / STRIDE
            sigma = max(0.6, min(w, h) / STRIDE / 5)
            g = np.exp(-((gx - ccx) ** 2 + (gy - ccy) ** 2) / (2 * sigma * sigma))
            heat[i, int(cls)] = np.maximum(heat[i, int(cls)], g)
            # box regression on the cells within one cell of the centre, so neighbours agree (NMS merges them)
            near = (np.abs(gx - ccx) <= 1.0) & (np.abs(gy - ccy) <= 1.0)
            box[i, 0][near] = (ccx - gx)[near]
            box[i, 1][near] = (ccy - gy)[near]
            box[i, 2][near] = np.log(w / BOX_SCALE)
            box[i, 3][near] = np.log(h / BOX_SCALE)
            weight[i, 0][near] = 1.0
        for cls, cx, cy, _w, _h in objects:  # exact centre cell peaks at 1
            heat[i, int(cls), min(int(cy / STRIDE), GRID - 1), min(int(cx / STRIDE), GRID - 1)] = 1.0
    return heat, box, weight


# --------------------------------------------------------------------------- post-processing / scoring
def detections(output: np.ndarray, conf: float = 0.25, iou: float = 0.5):
    """YOLO-style [N, 4+C, A] output -> per image an array of rows (class, score, x1, y1, x2, y2)."""
    from tnopt.task_metrics import decode_yolo  # the same decode the metric uses

    return decode_yolo(output, conf=conf, iou=iou, layout="channels_first", box_format="xywh")


def f1_against_truth(output: np.ndarray, objects_list, conf: float = 0.25, iou: float = 0.5) -> dict:
    from tnopt.task_metrics import match_detections

    dets = detections(output, conf, iou)
    tp = fp = fn = 0
    for det, objs in zip(dets, objects_list):
        truth = np.zeros((len(objs), 6), np.float32)
        if len(objs):
            truth[:, 0] = objs[:, 0]
            truth[:, 1] = 1.0
            truth[:, 2] = objs[:, 1] - objs[:, 3] / 2
            truth[:, 3] = objs[:, 2] - objs[:, 4] / 2
            truth[:, 4] = objs[:, 1] + objs[:, 3] / 2
            truth[:, 5] = objs[:, 2] + objs[:, 4] / 2
        t, p, f = match_detections(truth, det, iou)
        tp, fp, fn = tp + t, fp + p, fn + f
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": precision,
        "recall": recall,
        "f1": 2 * tp / max(2 * tp + fp + fn, 1),
    }


# --------------------------------------------------------------------------- model
def build_model():
    import torch
    import torch.nn as nn

    def block(cin, cout, stride=1):
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                *block(3, 24),
                *block(24, 32, 2),
                *block(32, 48),
                *block(48, 64, 2),
                *block(64, 64),
                *block(64, 96),
                *block(96, 96),
            )
            self.head = nn.Sequential(*block(96, 64), nn.Conv2d(64, 4 + NUM_CLASSES, 1))
            self.head[-1].bias.data[4:] = -2.2  # heatmap prior ~0.1
            gy, gx = np.mgrid[0:GRID, 0:GRID] + 0.5
            self.register_buffer("grid_x", torch.tensor(gx.reshape(1, 1, -1), dtype=torch.float32))
            self.register_buffer("grid_y", torch.tensor(gy.reshape(1, 1, -1), dtype=torch.float32))
            self.decode = False

        def forward(self, x):
            raw = self.head(self.body(x))
            if not self.decode:
                return raw
            flat = raw.flatten(2)  # [N, 4+C, A]
            cx = (self.grid_x + flat[:, 0:1]) * STRIDE
            cy = (self.grid_y + flat[:, 1:2]) * STRIDE
            wh = torch.exp(flat[:, 2:4].clamp(-4, 4)) * BOX_SCALE
            scores = torch.sigmoid(flat[:, 4:])
            return torch.cat([cx, cy, wh, scores], dim=1)

    return Detector()


def fold_batchnorm(model):
    """Replace every Conv2d -> BatchNorm2d pair by one Conv2d (export has no BatchNormalization)."""
    import torch
    import torch.nn as nn

    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        layers = list(seq)
        out = []
        i = 0
        while i < len(layers):
            layer = layers[i]
            if (
                isinstance(layer, nn.Conv2d)
                and i + 1 < len(layers)
                and isinstance(layers[i + 1], nn.BatchNorm2d)
            ):
                bn = layers[i + 1]
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                fused = nn.Conv2d(
                    layer.in_channels,
                    layer.out_channels,
                    layer.kernel_size,
                    layer.stride,
                    layer.padding,
                    bias=True,
                )
                fused.weight.data = layer.weight.data * scale.data[:, None, None, None]
                bias = layer.bias.data if layer.bias is not None else torch.zeros_like(bn.running_mean)
                fused.bias.data = (bias - bn.running_mean) * scale.data + bn.bias.data
                out.append(fused)
                i += 2
            else:
                out.append(layer)
                i += 1
        seq._modules.clear()
        for j, layer in enumerate(out):
            seq.add_module(str(j), layer)
    return model


def focal_loss(pred_logits, target):
    import torch
    import torch.nn.functional as F

    p = torch.sigmoid(pred_logits).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).float()
    neg = 1 - pos
    pos_loss = -torch.log(p) * (1 - p) ** 2 * pos
    neg_loss = -torch.log(1 - p) * p**2 * (1 - target) ** 4 * neg
    num_pos = pos.sum().clamp(min=1)
    return (pos_loss.sum() + neg_loss.sum()) / num_pos + 0 * F.relu(pred_logits).sum()


def train(steps: int, batch: int, seed: int = 0, time_limit: float = 900.0):
    import torch

    torch.manual_seed(seed)
    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    rng = np.random.default_rng(seed)
    start = time.process_time()
    model.train()
    for step in range(steps):
        images = np.empty((batch, 3, IMG, IMG), np.float32)
        objects = []
        for i in range(batch):
            images[i], objs = make_image(rng)
            if rng.random() < 0.5:  # horizontal flip (triangles and crosses stay themselves)
                images[i] = images[i][:, :, ::-1]
                objs = objs.copy()
                objs[:, 1] = IMG - objs[:, 1]
            objects.append(objs)
        heat, box, weight = (torch.from_numpy(a) for a in make_targets(objects))
        raw = model(torch.from_numpy(images))
        loss_heat = focal_loss(raw[:, 4:], heat)
        loss_box = (torch.abs(raw[:, :4] - box) * weight).sum() / weight.sum().clamp(min=1)
        loss = loss_heat + loss_box
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            used = time.process_time() - start
            print(
                f"step {step} loss {loss.item():.3f} heat {loss_heat.item():.3f} box {loss_box.item():.3f} "
                f"cpu {used:.0f}s",
                flush=True,
            )
            if used > time_limit:
                print(f"CPU time limit {time_limit}s reached at step {step}", flush=True)
                break
    return model


def export(model, path: str = ONNX_PATH):
    import torch

    model.eval()
    fold_batchnorm(model)
    model.decode = True
    dummy = torch.zeros(1, 3, IMG, IMG)
    torch.onnx.export(
        model,
        dummy,
        path,
        input_names=["images"],
        output_names=["output0"],
        dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}},
        opset_version=17,
        dynamo=False,
        do_constant_folding=True,
    )


def run_onnx(path: str, images: np.ndarray, batch: int = 64) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return np.concatenate(
        [sess.run(None, {"images": images[i : i + batch]})[0] for i in range(0, len(images), batch)]
    )


def write_data_files(n_calib: int = 64, n_eval: int = 256):
    """calibration / eval .npz for the tnopt CLI (small, generated by seed; not committed)."""
    out = {}
    for name, n, seed in (("calib", n_calib, CALIB_SEED), ("eval", n_eval, EVAL_SEED)):
        images, _ = make_data(n, seed)
        path = os.path.join(HERE, f"shapes_{name}.npz")
        np.savez(path, images=images)
        out[name] = path
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cpu-limit", type=float, default=840.0, help="stop training after this CPU time")
    parser.add_argument("--held-out", type=int, default=400)
    parser.add_argument("--eval-only", action="store_true")
    parser.add_argument(
        "--write-data", action="store_true", help="write models/shapes_calib.npz (64) and shapes_eval.npz (256)"
    )
    args = parser.parse_args(argv)
    if args.write_data:
        print(write_data_files())
        return
    sys.path.insert(0, os.path.dirname(HERE))
    if not args.eval_only:
        import torch

        torch.set_num_threads(args.threads)
        t0 = time.time()
        model = train(args.steps, args.batch, time_limit=args.cpu_limit)
        print(f"trained in {time.time() - t0:.0f}s wall, {time.process_time():.0f}s CPU", flush=True)
        export(model)
    images, objects = make_data(args.held_out, HELD_OUT_SEED)
    scores = f1_against_truth(run_onnx(ONNX_PATH, images), objects)
    print(
        f"held-out ({args.held_out} images, seed {HELD_OUT_SEED}, {sum(len(o) for o in objects)} objects): "
        + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items())
    )


if __name__ == "__main__":
    main()
