"""bench/heal.py's real-model rows: offline data split by *source* (documents, photos), and FLOPs
counted over every MatMul / Gemm / Conv of a graph at real per-sample shapes.

MiniLM (all-MiniLM-L6-v2, models/minilm.py): calibration = prose sentences of the Python Language
Reference that ships with the interpreter (pydoc_data.topics); evaluation = sentences of two other
documents: models/minilm.py's 64 hand-written everyday sentences and the prose of scikit-learn's
dataset descriptions (sklearn/datasets/descr/*.rst, in the wheel). No evaluation sentence comes from
the calibration document. Budget charged on the mean per-sentence cosine of the pooled embeddings.

EfficientNet-Lite0 (models/efficientnet.py): calibration = random crops of some skimage.data photos,
evaluation = random crops of *other* photos (no evaluation crop shares a photo with a calibration
crop; the stereo motorcycle pair counts as one photo and calibrates). Budget: top-1 agreement with
the original (the default metric for a classifier output without labels).
"""

from __future__ import annotations

import glob
import os
import re
import sys
import tempfile
from math import prod
from pathlib import Path

import numpy as np
import onnx

from tnopt.layout import bind_shapes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))

# Photos of skimage.data (all in the wheel). Each group mixes objects, textures and scientific
# images, so neither split is easier by kind; the motorcycle stereo pair (one scene) stays together.
CALIB_PHOTOS = (
    "chelsea",
    "astronaut",
    "motorcycle_left",
    "motorcycle_right",
    "camera",
    "grass",
    "coins",
    "hubble_deep_field",
    "immunohistochemistry",
)
EVAL_PHOTOS = ("coffee", "rocket", "clock", "brick", "gravel", "moon", "retina")


def prose_sentences(text: str, max_chars: int = 150) -> list[str]:
    """Plain-prose sentences of `text` (no code or markup characters), 40 to `max_chars` long,
    sorted and unique — the filter of minilm.reference_manual_sentences."""
    pieces = re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text))
    return sorted(
        {
            p.strip()
            for p in pieces
            if 40 < len(p.strip()) <= max_chars and p.strip()[0].isupper() and not set("`*:>=[{_|") & set(p)
        }
    )


def dataset_description_sentences() -> list[str]:
    """Prose of scikit-learn's bundled dataset descriptions (sklearn/datasets/descr/*.rst)."""
    import sklearn

    folder = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "descr")
    files = sorted(glob.glob(os.path.join(folder, "*.rst")))
    if not files:
        raise SystemExit(f"{folder}: no dataset descriptions (scikit-learn without its data files?)")
    return prose_sentences(" ".join(Path(f).read_text() for f in files))


# -- a calibration pool of many documents ---------------------------------------------------------
# Offline English prose of several kinds, none of it an evaluation document: the Python Language
# Reference, docstrings of the standard library and of numpy / scipy / torch / onnx (read with ast,
# nothing imported), and the license texts Debian ships. scikit-learn is left out: its dataset
# descriptions are an evaluation document.
DOCSTRING_PACKAGES = ("numpy", "scipy", "torch", "onnx")
SKIPPED_FOLDERS = {"site-packages", "test", "tests", "testing", "idlelib", "lib2to3", "__pycache__"}


def _docstrings(folder: str) -> str:
    """Every module, class and function docstring of the .py files under `folder` (test folders
    left out), in path order."""
    import ast

    texts = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_FOLDERS)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                tree = ast.parse(Path(root, name).read_text(errors="ignore"))
            except (SyntaxError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        texts.append(doc)
    return " ".join(texts)


def pool_sources() -> dict[str, str]:
    """{source: its text} of the calibration pool; sources absent on this machine are left out."""
    import importlib.util
    import sysconfig
    from pydoc_data.topics import topics

    sources = {"python-reference": " ".join(topics[k] for k in sorted(topics))}
    sources["stdlib-docstrings"] = _docstrings(sysconfig.get_paths()["stdlib"])
    for package in DOCSTRING_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin:
            sources[f"{package}-docstrings"] = _docstrings(os.path.dirname(spec.origin))
    licenses = [f for f in sorted(glob.glob("/usr/share/common-licenses/*")) if os.path.isfile(f)]
    if licenses:
        sources["licenses"] = " ".join(Path(f).read_text(errors="ignore") for f in licenses)
    return sources


def pool_sentences(count: int, exclude=(), seed: int = 0) -> tuple[list[str], dict[str, int]]:
    """`count` prose sentences drawn round-robin from the pool's sources (each source's sentences
    shuffled with `seed`), none in `exclude`; and how many each source gave. A source that runs
    out leaves its turns to the others."""
    import random

    excluded = set(exclude)
    queues = {}
    for name, text in pool_sources().items():
        sentences = [s for s in prose_sentences(text) if s not in excluded]
        random.Random(seed).shuffle(sentences)
        queues[name] = sentences
    taken, seen, counts = [], set(), {name: 0 for name in queues}
    while len(taken) < count and any(queues.values()):
        for name, queue in queues.items():
            while queue and len(taken) < count:
                sentence = queue.pop()
                if sentence not in seen:
                    seen.add(sentence)
                    taken.append(sentence)
                    counts[name] += 1
                    break
    return taken, counts


def minilm_task(calib_n: int, pool: bool = False):
    """(model path, calibration tokens, evaluation tokens, description of the data). `pool`: the
    calibration sentences come from the many-document pool (`pool_sentences`), else from the
    Python Language Reference alone."""
    import minilm

    path = Path(tempfile.mkdtemp(prefix="tnopt-heal-minilm-")) / "minilm.onnx"
    minilm.export_minilm(path)
    descriptions = dataset_description_sentences()
    eval_sentences = list(minilm.SENTENCES) + descriptions
    if pool:
        calib_sentences, counts = pool_sentences(calib_n, exclude=eval_sentences)
        source = "the pool of " + ", ".join(f"{k} {v}" for k, v in counts.items())
    else:
        calib_sentences = minilm.reference_manual_sentences(calib_n)
        source = f"the Python Language Reference (pydoc_data.topics, Python {sys.version.split()[0]})"
    shared = set(calib_sentences) & set(eval_sentences)
    assert not shared, f"evaluation sentences also in the calibration document: {sorted(shared)[:3]}"
    note = (
        f"calibration: {len(calib_sentences)} sentences of {source}; evaluation: {len(minilm.SENTENCES)} "
        f"sentences of models/minilm.py's SENTENCES + {len(descriptions)} of scikit-learn's dataset "
        "descriptions (sklearn/datasets/descr/*.rst) — other documents"
    )
    return path, minilm.tokenize(calib_sentences), minilm.tokenize(eval_sentences), note


def efficientnet_task(calib_n: int, eval_n: int):
    """(model path, calibration crops, evaluation crops, description of the data)."""
    import efficientnet

    assert not set(CALIB_PHOTOS) & set(EVAL_PHOTOS)
    path = Path(tempfile.mkdtemp(prefix="tnopt-heal-effnet-")) / "efficientnet-lite0.onnx"
    efficientnet.export_efficientnet_lite0(path)
    calib = {"input": efficientnet.photo_crops(CALIB_PHOTOS, calib_n, seed=0)}
    evaluation = {"input": efficientnet.photo_crops(EVAL_PHOTOS, eval_n, seed=1)}
    note = (
        f"calibration: {calib_n} random crops (35–100% of the short side, half mirrored) of the skimage.data "
        f"photos {', '.join(CALIB_PHOTOS)}; evaluation: {eval_n} crops of the other photos "
        f"{', '.join(EVAL_PHOTOS)}"
    )
    return path, calib, evaluation, note


# -- FLOPs of a whole graph ------------------------------------------------------------------------
def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose large initializers keep their shape but not their data (shape inference needs
    the values of small ones only: Reshape targets, axes)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in out.graph.initializer:
        if prod(tensor.dims) > 1024:
            stub = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=list(tensor.dims))
            tensor.CopyFrom(stub)
    return out


def _static(value) -> list[int] | None:
    t = value.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return None if None in dims else dims


def graph_flops(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> int:
    """2·multiply-adds of every MatMul, Gemm and Conv (constant weights or not: a transformer's
    attention products count) for inputs of these static shapes."""
    bound = bind_shapes(_skeleton(model), shapes)
    known = {v.name: _static(v) for v in [*bound.graph.input, *bound.graph.value_info, *bound.graph.output]}
    known.update({t.name: list(t.dims) for t in bound.graph.initializer})
    total = 0
    for node in bound.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        a, b, out = known.get(node.input[0]), known.get(node.input[1]), known.get(node.output[0])
        if a is None or b is None or out is None:
            raise ValueError(f"{node.name}: shapes not inferred")
        if node.op_type == "MatMul":
            total += 2 * prod(out) * a[-1]
        elif node.op_type == "Gemm":
            trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
            total += 2 * prod(out) * (a[0] if trans_a else a[1])
        else:
            total += 2 * prod(out) * prod(b[1:])  # b: (O, I/group, *kernel)
    return total


def mean_flops(model: onnx.ModelProto, samples: list[tuple[dict[str, list[int]], int]]) -> float:
    """Σ count·graph_flops(shapes) / Σ count over (per-sample input shapes, count) pairs."""
    return sum(n * graph_flops(model, shapes) for shapes, n in samples) / sum(n for _, n in samples)


def per_sample_shapes(data: dict[str, np.ndarray]) -> list[tuple[dict[str, list[int]], int]]:
    """Each sample's own input shapes: a token batch's sentences at their unpadded lengths (the
    attention mask), an image batch's first sample."""
    if "attention_mask" in data:
        lengths = data["attention_mask"].sum(axis=1)
        values, counts = np.unique(lengths, return_counts=True)
        return [({k: [1, int(length)] for k in data}, int(count)) for length, count in zip(values, counts)]
    return [({k: [1, *v.shape[1:]] for k, v in data.items()}, 1)]
