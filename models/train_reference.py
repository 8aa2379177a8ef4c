#!/usr/bin/env python3
"""Train the tnopt reference models on Fashion-MNIST and export them to ONNX.

Usage:
    python models/train_reference.py [--only NAME] [--epochs N]

Produces, next to this script:
    fc2.onnx, lenet5.onnx, cnn4.onnx, vgg.onnx, resnet.onnx
    calib.npz  (test images 0..1023,    1024 samples)
    eval.npz   (test images 1024..3071, 2048 samples, disjoint from calib)
    README.md  (regenerated from every reference .onnx present in this folder)

Every model takes "input" float32 [batch, 1, 28, 28] normalized as
(x / 255 - 0.2860) / 0.3530 and returns "logits" float32 [batch, 10].
The batch dimension is dynamic.  BatchNorm is folded into the preceding Conv
in torch before export, so no BatchNormalization node is left in any graph.

Training is CPU-only (torch.set_num_threads(2)) and seeded, so reruns
reproduce the same weights on the same software stack.
"""

from __future__ import annotations

import argparse
import collections
import copy
import gzip
import os
import random
import sys
import time
import warnings

# Passive OpenMP waiting: with busy-waiting threads, training slows down by 10x+
# whenever another process competes for the 2 cores. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REFERENCE_MODELS = ["fc2", "lenet5", "cnn4", "vgg", "resnet"]

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = "/usr/share/datasets/fashion-mnist"
MEAN, STD = 0.2860, 0.3530
SEED = 0
BATCH = 128
OPSET = 17
CALIB_RANGE = (0, 1024)
EVAL_RANGE = (1024, 3072)

DESCRIPTIONS = {
    "fc2": "FC-2 MLP: Flatten, Linear(784,300), ReLU, Linear(300,10)",
    "lenet5": "LeNet-5: Conv(1>6,5x5,p2) ReLU MaxPool, Conv(6>16,5x5) ReLU MaxPool, "
    "Linear 400>120>84>10 (ReLU between)",
    "cnn4": "Vanilla 4-layer CNN: Conv3x3 32,32, MaxPool, Conv3x3 64,64, MaxPool, "
    "Linear(3136,10) (ReLU after each conv)",
    "vgg": "VGG-style: [32,32,M,64,64,M,128,128,M] Conv3x3+BN(folded)+ReLU, "
    "Linear(1152,256) ReLU Dropout Linear(256,256) ReLU Linear(256,10)",
    "resnet": "ResNet-style: stem Conv3x3>32 BN ReLU, 3 stages x 2 BasicBlocks (32,64,128; "
    "stride 2 + 1x1 projection at stages 2,3; BN folded), GlobalAvgPool, Linear(128,10)",
}

# Per-model training budget, sized for ~25 min total on 2 CPU cores.
# (epochs, number of training images used: a fixed seeded subset of the 60k)
TRAIN_CFG = {
    "fc2": dict(epochs=4, n_train=60000, lr=1e-3),
    "lenet5": dict(epochs=4, n_train=60000, lr=2e-3),
    "cnn4": dict(epochs=3, n_train=40000, lr=1e-3),
    "vgg": dict(epochs=3, n_train=30000, lr=1e-3),
    "resnet": dict(epochs=2, n_train=30000, lr=2e-3),
}


# --------------------------------------------------------------------------- data
def _read_idx(path: str, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images float32 [N,1,28,28] normalized, labels int64 [N])."""
    prefix = "train" if split == "train" else "t10k"
    x = _read_idx(os.path.join(DATA_DIR, f"{prefix}-images-idx3-ubyte.gz"), 16)
    y = _read_idx(os.path.join(DATA_DIR, f"{prefix}-labels-idx1-ubyte.gz"), 8)
    x = x.reshape(-1, 1, 28, 28).astype(np.float32)
    x = (x / 255.0 - MEAN) / STD
    return x.astype(np.float32), y.astype(np.int64)


# --------------------------------------------------------------------------- models
class ConvBN(nn.Module):
    """Conv2d (no bias) + BatchNorm2d; replaced by a single Conv2d before export."""

    def __init__(self, cin, cout, k, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x))

    def fused(self) -> nn.Conv2d:
        conv, bn = self.conv, self.bn
        fused = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=True,
        )
        with torch.no_grad():
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
            b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            fused.bias.copy_((b - bn.running_mean) * scale + bn.bias)
        return fused


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Returns a deep copy of `model` (eval mode) with every ConvBN replaced by a Conv2d."""
    model = copy.deepcopy(model).eval()

    def _replace(parent: nn.Module):
        for name, child in parent.named_children():
            if isinstance(child, ConvBN):
                setattr(parent, name, child.fused())
            else:
                _replace(child)

    _replace(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    return model


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = ConvBN(cin, cout, 3, stride=stride, padding=1)
        self.c2 = ConvBN(cout, cout, 3, stride=1, padding=1)
        self.short = ConvBN(cin, cout, 1, stride=stride) if (stride != 1 or cin != cout) else None

    def forward(self, x):
        out = F.relu(self.c1(x))
        out = self.c2(out)
        idt = x if self.short is None else self.short(x)
        return F.relu(out + idt)


class ResNet(nn.Module):
    def __init__(self, widths=(32, 64, 128), blocks=2):
        super().__init__()
        self.stem = ConvBN(1, widths[0], 3, padding=1)
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.layers(x)
        return self.fc(self.flatten(self.pool(x)))


def build_model(name: str) -> nn.Module:
    if name == "fc2":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 10))
    if name == "lenet5":
        return nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(400, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, 10),
        )
    if name == "cnn4":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 10),
        )
    if name == "vgg":
        cfg = [32, 32, "M", 64, 64, "M", 128, 128, "M"]
        layers, cin = [], 1
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [ConvBN(cin, v, 3, padding=1), nn.ReLU()]
                cin = v
        return nn.Sequential(
            *layers,
            nn.Flatten(),
            nn.Linear(cin * 3 * 3, 256),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Linear(256, 10),
        )
    if name == "resnet":
        return ResNet()
    raise ValueError(f"unknown model {name!r}; choose from {REFERENCE_MODELS}")


# --------------------------------------------------------------------------- training
def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(
    name: str, model: nn.Module, xtr: np.ndarray, ytr: np.ndarray, epochs: int, n_train: int, lr: float
) -> float:
    seed_everything(SEED)
    gen = torch.Generator().manual_seed(SEED)
    subset = torch.randperm(len(xtr), generator=gen)[:n_train]
    x = torch.from_numpy(xtr)[subset]
    y = torch.from_numpy(ytr)[subset]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((n_train + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    t0 = time.time()
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(n_train, generator=gen)
        tot_loss, correct = 0.0, 0
        te = time.time()
        for i in range(0, n_train, BATCH):
            idx = perm[i : i + BATCH]
            xb, yb = x[idx], y[idx]
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += loss.item() * len(idx)
            correct += (out.argmax(1) == yb).sum().item()
            if (i // BATCH + 1) % 100 == 0:
                print(
                    f"[{name}]   epoch {ep + 1} batch {i // BATCH + 1}  {time.time() - te:.0f}s", flush=True
                )
        print(
            f"[{name}] epoch {ep + 1}/{epochs}  loss {tot_loss / n_train:.4f}  "
            f"train-acc {correct / n_train:.4f}  {time.time() - te:.1f}s",
            flush=True,
        )
    model.eval()
    return time.time() - t0


# --------------------------------------------------------------------------- export / check
def export(name: str, model: nn.Module) -> str:
    import onnx

    model = fold_batchnorm(model)
    path = os.path.join(HERE, f"{name}.onnx")
    tmp = path + ".tmp"  # export to a temp file, then rename atomically
    dummy = torch.zeros(1, 1, 28, 28)
    with warnings.catch_warnings():  # dynamo=False is deprecated but intentionally used
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (dummy,),
            tmp,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    m = onnx.load(tmp)
    onnx.checker.check_model(m, full_check=True)
    ops = [n.op_type for n in m.graph.node]
    assert "BatchNormalization" not in ops, f"{name}: BatchNormalization left in graph"
    assert "MatMul" not in ops, f"{name}: Linear not exported as Gemm"
    inits = {i.name for i in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type in ("Conv", "Gemm"):
            for inp in n.input[1:]:
                assert inp in inits, f"{name}: {n.op_type} {n.name} input {inp} not an initializer"
    os.replace(tmp, path)
    return path


def ort_session(path: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def ort_logits(sess, x: np.ndarray, bs: int = 1000) -> np.ndarray:
    return np.concatenate([sess.run(["logits"], {"input": x[i : i + bs]})[0] for i in range(0, len(x), bs)])


def verify_against_torch(name: str, model: nn.Module, path: str, x: np.ndarray):
    sess = ort_session(path)
    xs = x[:256]
    with torch.no_grad():
        ref_unfused = model.eval()(torch.from_numpy(xs)).numpy()
        ref = fold_batchnorm(model)(torch.from_numpy(xs)).numpy()
    got = ort_logits(sess, xs)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    print(
        f"[{name}] ORT vs torch(folded): max|diff| {np.abs(got - ref).max():.2e}; "
        f"folded vs unfused torch: max|diff| {np.abs(ref - ref_unfused).max():.2e}",
        flush=True,
    )


def onnx_stats(path: str) -> dict:
    import onnx

    m = onnx.load(path)
    counts = collections.Counter(n.op_type for n in m.graph.node)
    params = sum(int(np.prod(i.dims)) for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT)
    return dict(ops=counts, params=params, size=os.path.getsize(path))


def fmt_ops(counts: collections.Counter) -> str:
    order = ["Conv", "Gemm", "Relu", "MaxPool", "Add", "GlobalAveragePool", "Flatten"]
    keys = [k for k in order if k in counts] + sorted(k for k in counts if k not in order)
    return ", ".join(f"{k} {counts[k]}" for k in keys)


def accuracy(sess, x, y) -> float:
    return float((ort_logits(sess, x).argmax(1) == y).mean())


# --------------------------------------------------------------------------- artifacts
def write_splits(xte: np.ndarray, yte: np.ndarray):
    for fname, (a, b) in (("calib.npz", CALIB_RANGE), ("eval.npz", EVAL_RANGE)):
        path = os.path.join(HERE, fname)
        with open(path + ".tmp", "wb") as f:
            np.savez_compressed(
                f, input=np.ascontiguousarray(xte[a:b], dtype=np.float32), labels=yte[a:b].astype(np.int64)
            )
        os.replace(path + ".tmp", path)


def write_readme(xte: np.ndarray, yte: np.ndarray, train_times: dict[str, float]):
    ev = np.load(os.path.join(HERE, "eval.npz"))
    rows = []
    for name in REFERENCE_MODELS:
        path = os.path.join(HERE, f"{name}.onnx")
        if not os.path.exists(path):
            continue
        st = onnx_stats(path)
        sess = ort_session(path)
        acc_test = accuracy(sess, xte, yte)
        acc_eval = accuracy(sess, ev["input"], ev["labels"])
        print(
            f"[{name}] ORT test-acc {acc_test:.4f}  eval.npz-acc {acc_eval:.4f}  "
            f"params {st['params']}  {st['size'] / 1e6:.2f} MB  ops: {fmt_ops(st['ops'])}",
            flush=True,
        )
        rows.append(
            f"| `{name}.onnx` | {DESCRIPTIONS[name]} | {st['params']:,} | "
            f"{st['size'] / 1e6:.2f} MB | {100 * acc_test:.2f}% | {100 * acc_eval:.2f}% | "
            f"{fmt_ops(st['ops'])} |"
        )
    cfg_lines = "\n".join(
        f"| {n} | {c['epochs']} | {c['n_train']:,} | {c['lr']:g} |" for n, c in TRAIN_CFG.items()
    )
    text = f"""# Reference models

Five small Fashion-MNIST classifiers used as tnopt's reference / test inputs.
`cnn4.onnx` is the embedded default model that the command in the main README compresses.

All models: input `input` float32 `[batch, 1, 28, 28]`, output `logits` float32
`[batch, 10]`, dynamic batch dimension, opset {OPSET}, exported with
`torch.onnx.export(..., dynamo=False, do_constant_folding=True)` in eval mode.
BatchNorm is folded into the preceding Conv in torch before export (no
`BatchNormalization` node remains), all Conv/Gemm weights are initializers, and
every `nn.Linear` is a `Gemm`. Dropout disappears in eval-mode export.

Normalization: `x = (pixel / 255 - 0.2860) / 0.3530`.

| file | description | params | size | test acc (10k, ORT) | eval.npz acc (ORT) | ops |
|---|---|---:|---:|---:|---:|---|
{chr(10).join(rows)}

Params = number of float elements in the ONNX initializers (after BN folding).

## Data splits (all taken from the 10k Fashion-MNIST **test** set)

- `calib.npz`: test images {CALIB_RANGE[0]}..{CALIB_RANGE[1] - 1} ({CALIB_RANGE[1] - CALIB_RANGE[0]} samples), for calibration.
- `eval.npz`: test images {EVAL_RANGE[0]}..{EVAL_RANGE[1] - 1} ({EVAL_RANGE[1] - EVAL_RANGE[0]} samples), disjoint from `calib.npz`, for accuracy checks.

Each has `input` (float32 `[N,1,28,28]`, already normalized) and `labels` (int64 `[N]`).
No training image is used in either file; the models never saw the test set during training.

## Reproducing

```
python models/train_reference.py            # all five models (~15-25 min on 2 CPU cores, load-dependent)
python models/train_reference.py --only vgg # one model; --epochs N overrides the epoch count
```

Seeded (seed {SEED}), CPU only, `torch.set_num_threads(2)`, Adam, batch {BATCH},
one-cycle LR schedule, no augmentation; training images are a fixed seeded subset:

| model | epochs | train images | max lr |
|---|---:|---:|---:|
{cfg_lines}

The README is regenerated on each run from the `.onnx` files present (accuracies are measured with
onnxruntime's CPU provider).
"""
    if train_times:
        text += (
            "\nTraining wall time of the last run: "
            + ", ".join(f"{k} {v:.0f}s" for k, v in train_times.items())
            + f" (total {sum(train_times.values()):.0f}s).\n"
        )
    with open(os.path.join(HERE, "README.md"), "w") as f:
        f.write(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=REFERENCE_MODELS, help="train/export only this model")
    ap.add_argument("--epochs", type=int, help="override the per-model epoch count")
    args = ap.parse_args(argv)

    torch.set_num_threads(2)
    seed_everything(SEED)
    xtr, ytr = load_split("train")
    xte, yte = load_split("test")
    write_splits(xte, yte)

    names = [args.only] if args.only else REFERENCE_MODELS
    times = {}
    t_all = time.time()
    for name in names:
        cfg = dict(TRAIN_CFG[name])
        if args.epochs is not None:
            cfg["epochs"] = args.epochs
        seed_everything(SEED)
        model = build_model(name)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"[{name}] training: {cfg}  ({n_params:,} trainable params)", flush=True)
        times[name] = train(name, model, xtr, ytr, **cfg)
        path = export(name, model)
        verify_against_torch(name, model, path, xte)
        print(f"[{name}] exported {path}  (train {times[name]:.0f}s)", flush=True)
    print(f"total training time {sum(times.values()):.0f}s, wall {time.time() - t_all:.0f}s", flush=True)
    write_readme(xte, yte, times if not args.only else {})
    return 0


if __name__ == "__main__":
    sys.exit(main())
