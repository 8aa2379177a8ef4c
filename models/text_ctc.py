#!/usr/bin/env python3
"""A small CTC text recognizer trained here on strings rendered with the DejaVu fonts.

Usage:
    python models/text_ctc.py [--steps N] [--threads T]     # train, export, evaluate
    python models/text_ctc.py --eval-only                   # evaluate the committed ONNX

Images: 32x128 grayscale in 0..1, one line of 3..8 characters from ALPHABET (digits + lowercase), rendered
with one of the DejaVu fonts (Sans, Sans Bold, Sans Mono, Serif, Sans Condensed) at 15..21 px, random
offset, random ink/paper contrast, blur-free pixel noise.  `make_data(n, seed)` is the one source of
training, calibration and held-out images (held-out: seed 1000, never seen in training).

Model: a fully convolutional CRNN-without-RNN (conv stack -> height collapsed -> 1-D convolutions over the
32 time steps), exported to ONNX as

    input  "x"     float32 [N, 1, 32, 128]
    output "probs" float32 [N, 32, 37]   (softmax over blank=0 + 36 characters, time-major per sample)

Decode: greedy CTC (argmax per step, merge repeats, drop blanks).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ONNX_PATH = os.path.join(HERE, "text_ctc.onnx")
HEIGHT, WIDTH = 32, 128
STEPS_T = 32
ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
BLANK = 0
FONT_DIR = "/usr/share/fonts/truetype/dejavu"
FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSansCondensed.ttf",
)
HELD_OUT_SEED = 1000
CALIB_SEED = 2000
EVAL_SEED = 3000

_FONT_CACHE: dict = {}


def _font(name: str, size: int):
    from PIL import ImageFont

    key = (name, size)
    if key not in _FONT_CACHE:
        path = os.path.join(FONT_DIR, name)
        if not os.path.exists(path):
            raise SystemExit(f"missing font {path}: apt-get install fonts-dejavu-core fonts-dejavu-extra")
        _FONT_CACHE[key] = ImageFont.truetype(path, size)
    return _FONT_CACHE[key]


def make_image(rng: np.random.Generator):
    """One image [1, 32, 128] float32 in 0..1 and its text."""
    from PIL import Image, ImageDraw

    for _attempt in range(10):
        text = "".join(rng.choice(list(ALPHABET), size=int(rng.integers(3, 9))))
        font = _font(FONT_FILES[int(rng.integers(len(FONT_FILES)))], int(rng.integers(15, 22)))
        left, top, right, bottom = font.getbbox(text)
        if right - left <= WIDTH - 4:
            break
    canvas = Image.new("L", (WIDTH, HEIGHT), 0)
    x = rng.uniform(2, max(2.0, WIDTH - (right - left) - 2)) - left
    y = (HEIGHT - (bottom - top)) / 2 - top + rng.uniform(-3, 3)
    ImageDraw.Draw(canvas).text((x, y), text, fill=255, font=font)
    ink_mask = np.asarray(canvas, np.float32) / 255.0
    paper = rng.uniform(0.0, 1.0)
    ink = paper + rng.choice([-1, 1]) * rng.uniform(0.35, 0.8)
    if not 0 <= ink <= 1:
        ink = paper - (ink - paper)
    ink = float(np.clip(ink, 0, 1))
    gradient = rng.uniform(-0.1, 0.1) * np.linspace(-1, 1, WIDTH)[None, :]
    img = paper + gradient + (ink - paper) * ink_mask + rng.normal(0, 0.04, size=(HEIGHT, WIDTH))
    return np.clip(img, 0, 1).astype(np.float32)[None], text


def make_data(n: int, seed: int):
    """n images [n, 1, 32, 128] and their n strings."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, 1, HEIGHT, WIDTH), np.float32)
    texts = []
    for i in range(n):
        images[i], text = make_image(rng)
        texts.append(text)
    return images, texts


def encode(text: str) -> list[int]:
    return [ALPHABET.index(ch) + 1 for ch in text]


def decode(probs: np.ndarray) -> list[str]:
    """Greedy CTC decode of [N, T, C] into strings (blank 0, index k -> ALPHABET[k-1])."""
    from tnopt.task_metrics import ctc_greedy_decode

    return ["".join(ALPHABET[k - 1] for k in seq) for seq in ctc_greedy_decode(probs, blank=BLANK)]


def character_error(predicted: list[str], truth: list[str]) -> float:
    from tnopt.task_metrics import levenshtein

    return sum(levenshtein(p, t) for p, t in zip(predicted, truth)) / sum(len(t) for t in truth)


# --------------------------------------------------------------------------- model
def build_model():
    import torch.nn as nn

    def block(cin, cout, kernel=3, padding=1):
        return [nn.Conv2d(cin, cout, kernel, 1, padding, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    class Recognizer(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                *block(1, 32),
                nn.MaxPool2d(2),  # 16 x 64
                *block(32, 64),
                nn.MaxPool2d(2),  # 8 x 32
                *block(64, 96),
                *block(96, 96),
                nn.MaxPool2d((2, 1)),  # 4 x 32
                *block(96, 128),
                *block(128, 128, (4, 1), 0),  # 1 x 32
                *block(128, 128, (1, 3), (0, 1)),
                *block(128, 128, (1, 3), (0, 1)),
                nn.Conv2d(128, len(ALPHABET) + 1, 1),
            )
            self.export_probs = False

        def forward(self, x):
            logits = self.body(x).squeeze(2).permute(0, 2, 1)  # [N, T, C]
            return logits.softmax(-1) if self.export_probs else logits

    return Recognizer()


def train(steps: int, batch: int, seed: int = 0, time_limit: float = 900.0):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.15)
    rng = np.random.default_rng(seed)
    start = time.process_time()
    model.train()
    for step in range(steps):
        images, texts = make_data(batch, int(rng.integers(1 << 30)) + 10_000)
        targets = torch.tensor([k for t in texts for k in encode(t)], dtype=torch.long)
        target_lengths = torch.tensor([len(t) for t in texts], dtype=torch.long)
        logits = model(torch.from_numpy(images))
        log_probs = logits.log_softmax(-1).permute(1, 0, 2)  # [T, N, C]
        input_lengths = torch.full((batch,), STEPS_T, dtype=torch.long)
        loss = F.ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=BLANK, zero_infinity=True)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            used = time.process_time() - start
            print(f"step {step} loss {loss.item():.3f} cpu {used:.0f}s", flush=True)
            if used > time_limit:
                print(f"CPU time limit {time_limit}s reached at step {step}", flush=True)
                break
    return model


def export(model, path: str = ONNX_PATH):
    import torch

    sys.path.insert(0, HERE)
    from shapes_detector import fold_batchnorm

    model.eval()
    fold_batchnorm(model)
    model.export_probs = True
    torch.onnx.export(
        model,
        torch.zeros(1, 1, HEIGHT, WIDTH),
        path,
        input_names=["x"],
        output_names=["probs"],
        dynamic_axes={"x": {0: "batch"}, "probs": {0: "batch"}},
        opset_version=17,
        dynamo=False,
        do_constant_folding=True,
    )


def run_onnx(path: str, images: np.ndarray, batch: int = 64) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return np.concatenate(
        [sess.run(None, {"x": images[i : i + batch]})[0] for i in range(0, len(images), batch)]
    )


def write_data_files(n_calib: int = 64, n_eval: int = 256):
    out = {}
    for name, n, seed in (("calib", n_calib, CALIB_SEED), ("eval", n_eval, EVAL_SEED)):
        images, _ = make_data(n, seed)
        path = os.path.join(HERE, f"text_{name}.npz")
        np.savez(path, x=images)
        out[name] = path
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cpu-limit", type=float, default=840.0)
    parser.add_argument("--held-out", type=int, default=400)
    parser.add_argument("--eval-only", action="store_true")
    parser.add_argument(
        "--write-data", action="store_true", help="write models/text_calib.npz (64) and text_eval.npz (256)"
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
    images, texts = make_data(args.held_out, HELD_OUT_SEED)
    predicted = decode(run_onnx(ONNX_PATH, images))
    cer = character_error(predicted, texts)
    exact = np.mean([p == t for p, t in zip(predicted, texts)])
    print(
        f"held-out ({args.held_out} images, seed {HELD_OUT_SEED}): character error {cer:.4f}, "
        f"exact match {exact:.4f}; examples {list(zip(texts[:5], predicted[:5]))}"
    )


if __name__ == "__main__":
    main()
