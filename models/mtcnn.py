#!/usr/bin/env python3
"""MTCNN's P-Net, R-Net and O-Net with their real weights, as ONNX, plus face-ish data to feed them.

Usage:
    pip download --no-deps facenet-pytorch -d WHEELS      # once; the weights are inside the wheel
    python models/mtcnn.py OUT_DIR --wheel WHEELS [--calib 256] [--eval 256] [--seed 0]

Writes OUT_DIR/{pnet,rnet,onet}.onnx and, per net, NET-calib.npz and NET-eval.npz (disjoint seeds).

Weights: the `facenet-pytorch` wheel ships the three state dicts as facenet_pytorch/data/{p,r,o}net.pt.
They are read here straight from the wheel (a .whl file, a folder holding one, or an unzipped wheel) at
run time and never committed; the package itself is not imported (it imports torchvision at module
level, which the PyPI build does not provide beside the CPU torch installed here). The architectures
are defined below with the wheel's parameter names, so loading is strict.

Exported graphs (torch.onnx.export, dynamo=False, opset 17; outputs in facenet-pytorch's order):
    pnet  image [batch, 3, height, width]  -> box_offsets [batch, 4, h', w'], face_prob [batch, 2, h', w']
          (fully convolutional: one 12x12 window per output position, stride 2)
    rnet  crop  [batch, 3, 24, 24]         -> box_offsets [batch, 4], face_prob [batch, 2]
    onet  crop  [batch, 3, 48, 48]         -> box_offsets [batch, 4], landmarks [batch, 10], face_prob [batch, 2]
face_prob is a Softmax over (non-face, face); MTCNN keeps a window or crop as a face at
face_prob[:, 1] >= 0.6 / 0.7 / 0.7 (its default thresholds per stage). Inputs are RGB in MTCNN's
normalisation (pixel - 127.5) / 128.

Data: skimage.data photos (offline). Half of every set is centred near the astronaut's face (the only
human face among them) with jittered size and position, the other half anywhere in the photos
(astronaut, cat, coffee, rocket, Hubble field: partial faces, non-faces and background). P-Net gets 64x64 windows of the photo
rescaled as MTCNN's pyramid does (the face 12-48 px across); R-Net and O-Net get 24x24 / 48x48 crops.
"""

from __future__ import annotations

import argparse
import io
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

OPSET = 17
CROP_SIZE = {"rnet": 24, "onet": 48}
PNET_WINDOW = 64
FACE_THRESHOLD = {"pnet": 0.6, "rnet": 0.7, "onet": 0.7}
# The astronaut's face in skimage.data.astronaut() (512 x 512): centre and side in pixels.
FACE_CENTRE, FACE_SIDE = (218.0, 95.0), 120.0
OUTPUTS = {
    "pnet": ["box_offsets", "face_prob"],
    "rnet": ["box_offsets", "face_prob"],
    "onet": ["box_offsets", "landmarks", "face_prob"],
}


class WheelMissing(FileNotFoundError):
    """The facenet-pytorch wheel (the weights) is not where it was looked for."""


# ----------------------------------------------------------------------------- architectures
class PNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)


class RNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        # the weights were converted from Caffe: the flatten reads (W, H, C) order
        x = self.prelu4(self.dense4(x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)


NETS = {"pnet": PNet, "rnet": RNet, "onet": ONet}


# ----------------------------------------------------------------------------- weights
def _wheel_source(where: str | Path | None) -> Path:
    """The wheel file or unzipped-wheel folder named by `where` (a .whl, a folder holding one, or a
    folder holding facenet_pytorch/data/)."""
    hint = (
        "the MTCNN weights ship inside the facenet-pytorch wheel: run "
        "`pip download --no-deps facenet-pytorch -d DIR` and pass --wheel DIR"
    )
    if where is None:
        raise WheelMissing(f"no facenet-pytorch wheel given; {hint}")
    path = Path(where)
    if path.is_file() and path.suffix == ".whl":
        return path
    if path.is_dir():
        if (path / "facenet_pytorch" / "data" / "pnet.pt").is_file():
            return path
        wheels = sorted(path.glob("facenet_pytorch-*.whl"))
        if wheels:
            return wheels[-1]
    raise WheelMissing(f"{path}: no facenet_pytorch-*.whl (or unzipped facenet_pytorch/data) there; {hint}")


def download_wheel(folder: str | Path) -> Path:
    """`pip download --no-deps facenet-pytorch` into `folder` (once); the wheel's path."""
    import subprocess

    folder = Path(folder)
    wheels = sorted(folder.glob("facenet_pytorch-*.whl"))
    if not wheels:
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "facenet-pytorch"]
            + ["-d", str(folder), "-q"],
            check=True,
            capture_output=True,
        )
        wheels = sorted(folder.glob("facenet_pytorch-*.whl"))
    return wheels[-1]


def load_state_dict(name: str, wheel: str | Path | None) -> dict:
    """NET's state dict (`pnet`, `rnet`, `onet`) read from the facenet-pytorch wheel."""
    source, member = _wheel_source(wheel), f"facenet_pytorch/data/{name}.pt"
    if source.is_dir():
        blob = (source / member).read_bytes()
    else:
        with zipfile.ZipFile(source) as archive:
            if member not in archive.namelist():
                raise WheelMissing(f"{source}: the wheel holds no {member}")
            blob = archive.read(member)
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def load_net(name: str, wheel: str | Path | None) -> nn.Module:
    net = NETS[name]()
    net.load_state_dict(load_state_dict(name, wheel), strict=True)
    return net.eval()


def export(name: str, path: str | Path, wheel: str | Path | None) -> Path:
    """NET with the wheel's weights as ONNX at `path` (P-Net: dynamic batch, height and width; R-Net
    and O-Net: dynamic batch)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = load_net(name, wheel)
    if name == "pnet":
        dummy = torch.zeros(1, 3, PNET_WINDOW, PNET_WINDOW)
        input_name, input_axes = "image", {0: "batch", 2: "height", 3: "width"}
        output_axes = {0: "batch", 2: "map_height", 3: "map_width"}
    else:
        side = CROP_SIZE[name]
        dummy = torch.zeros(1, 3, side, side)
        input_name, input_axes, output_axes = "crop", {0: "batch"}, {0: "batch"}
    axes = {input_name: input_axes} | {output: output_axes for output in OUTPUTS[name]}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter is asked for on purpose
        torch.onnx.export(
            net,
            (dummy,),
            str(path),
            input_names=[input_name],
            output_names=OUTPUTS[name],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    return path


# ----------------------------------------------------------------------------- data
def _photos() -> tuple[np.ndarray, list[np.ndarray]]:
    """(the astronaut, the other colour photos without human faces), uint8 HWC RGB."""
    import skimage.data as photos

    others = [photos.chelsea(), photos.coffee(), photos.rocket(), photos.hubble_deep_field()]
    return photos.astronaut(), [image[..., :3] for image in others]


def _normalise(crops: np.ndarray) -> np.ndarray:
    return ((crops - 127.5) * 0.0078125).astype(np.float32)


def _resize(patch: np.ndarray, side: int) -> np.ndarray:
    """HWC uint8 patch -> CHW float32 side x side (area interpolation, as MTCNN resamples)."""
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(patch.transpose(2, 0, 1), dtype=np.float32))[None]
    return F.interpolate(tensor, size=(side, side), mode="area")[0].numpy()


def face_crops(n: int, side: int, seed: int) -> np.ndarray:
    """n side x side crops in MTCNN's normalisation: even ones jittered around the astronaut's face
    (size and position), odd ones anywhere in any photo (faces, partial faces and background).
    bench/metrics.py's O-Net rows were measured on these crops (48 x 48)."""
    rng = np.random.default_rng(seed)
    astronaut, others = _photos()
    anywhere = [astronaut, *others]
    crops = np.empty((n, 3, side, side), np.float32)
    for i in range(n):
        if i % 2 == 0:
            image, size = astronaut, rng.uniform(0.75, 1.25) * FACE_SIDE
            cx, cy = FACE_CENTRE[0] + rng.normal(0, 12), FACE_CENTRE[1] + rng.normal(0, 12)
        else:
            image = anywhere[int(rng.integers(len(anywhere)))]
            size = rng.uniform(40, min(image.shape[:2]) * 0.8)
            cx = rng.uniform(size / 2, image.shape[1] - size / 2)
            cy = rng.uniform(size / 2, image.shape[0] - size / 2)
        x0, y0 = int(max(cx - size / 2, 0)), int(max(cy - size / 2, 0))
        crops[i] = _resize(image[y0 : y0 + int(size), x0 : x0 + int(size)], side)
    return _normalise(crops)


def pyramid_windows(n: int, seed: int, window: int = PNET_WINDOW) -> np.ndarray:
    """n window x window crops of photos rescaled as MTCNN's image pyramid does: even ones from the
    astronaut at a scale that makes the face 12-48 px across and keeps it inside the window, odd ones
    from the other photos at any scale in the same range."""
    rng = np.random.default_rng(seed)
    astronaut, others = _photos()
    windows = np.empty((n, 3, window, window), np.float32)
    for i in range(n):
        image = astronaut if i % 2 == 0 else others[int(rng.integers(len(others)))]
        face_px = rng.uniform(12, 48)
        scale = face_px / FACE_SIDE
        side = window / scale  # the window's side in the photo's pixels
        side = min(side, min(image.shape[:2]))
        if i % 2 == 0:  # the face inside the window, anywhere in it
            slack = max(side - FACE_SIDE, 0) / 2
            cx = FACE_CENTRE[0] + rng.uniform(-slack, slack)
            cy = FACE_CENTRE[1] + rng.uniform(-slack, slack)
        else:
            cx = rng.uniform(side / 2, image.shape[1] - side / 2)
            cy = rng.uniform(side / 2, image.shape[0] - side / 2)
        x0 = int(np.clip(cx - side / 2, 0, image.shape[1] - side))
        y0 = int(np.clip(cy - side / 2, 0, image.shape[0] - side))
        windows[i] = _resize(image[y0 : y0 + int(side), x0 : x0 + int(side)], window)
    return _normalise(windows)


def net_data(name: str, n: int, seed: int) -> np.ndarray:
    """NET's input samples: pyramid windows for P-Net, face-ish crops for R-Net / O-Net."""
    return pyramid_windows(n, seed) if name == "pnet" else face_crops(n, CROP_SIZE[name], seed)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder for the .onnx and .npz files")
    p.add_argument("--wheel", help="facenet-pytorch .whl, a folder holding it, or an unzipped wheel")
    p.add_argument("--nets", default="pnet,rnet,onet")
    p.add_argument("--calib", type=int, default=256, help="calibration samples per net")
    p.add_argument("--eval", type=int, default=256, help="held-out samples per net (another seed)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        _wheel_source(args.wheel)
    except WheelMissing as error:
        print(f"mtcnn.py: {error}", file=sys.stderr)
        return 2
    for name in args.nets.split(","):
        path = export(name, args.out / f"{name}.onnx", args.wheel)
        input_name = "image" if name == "pnet" else "crop"
        np.savez(args.out / f"{name}-calib.npz", **{input_name: net_data(name, args.calib, args.seed)})
        np.savez(args.out / f"{name}-eval.npz", **{input_name: net_data(name, args.eval, args.seed + 1000)})
        print(f"{path}  calib {args.calib}  eval {args.eval}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
