"""Seconds per measured plan: on the search's switchboard session vs exported with a session each.

    python bench/switchboard.py [--models minilm32,minilm96,cnn4,vgg,resnet] [--out bench/RESULTS.md]

The search times both ways once per run (tnopt.runner.time_plan_runs) and keeps the faster;
this prints the same two timings side by side, for one plan (the first candidate layer at its widest
SVD / Tucker-2 rank) on the data the sweep uses: MiniLM on 32 or 96 sentences, the reference
conv nets on 512 images.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "models"))

from data_aware import minilm_dataset  # noqa: E402
from methods import _markdown, append_results, dataset  # noqa: E402
from tnopt.passes import METHODS  # noqa: E402

from tnopt.analyze import analyze  # noqa: E402
from tnopt.io import load_model  # noqa: E402
from tnopt.pipeline import factorize  # noqa: E402
from tnopt.plan import Choice  # noqa: E402
from tnopt.report import format_table  # noqa: E402
from tnopt.runner import PlanRunner  # noqa: E402
from tnopt.runtime import Runtime  # noqa: E402


def widest(layers, method_for):
    choices = []
    for layer in layers:
        method = METHODS[method_for[layer.op]]
        ranks = method.candidate_ranks(layer) if method.check(layer) is None else []
        if ranks:
            rank = max(ranks, key=lambda r: method.cost(layer, r).params)
            choices.append(Choice(layer, method.name, factorize(layer, method.name, rank)))
    return choices


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="minilm32,minilm96,cnn4,vgg,resnet")
    p.add_argument("--out")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    runtime = Runtime("cpu")
    rows = [("model", "samples", "paths on board", "board s/plan", "export s/plan", "export / board")]
    for name in args.models.split(","):
        if name.startswith("minilm"):
            path, calib, _, _ = minilm_dataset()
            if name == "minilm32":
                calib = {k: v[:32] for k, v in calib.items()}
        else:
            path, calib, _, _ = dataset(name)
            calib = {k: v for k, v in calib.items() if k != "labels"}
        model = load_model(str(path))
        layers = [layer for layer in analyze(model) if layer.candidate]
        choices = widest(layers, {"Conv": "tucker2", "Gemm": "svd", "MatMul": "svd"})
        runner = PlanRunner(model, runtime)
        runner.prepare(choices, calib)  # builds the board and times one plan both ways
        timed = runner.timings
        on_board, exported = timed["switchboard"], timed["exported"]
        samples = len(next(iter(calib.values())))
        rows.append(
            (
                name,
                str(samples),
                str(len(choices)),
                f"{on_board:.2f}",
                f"{exported:.2f}",
                f"{exported / on_board:.2f}",
            )
        )
        print(format_table(rows[-1:]), flush=True)
    print("\n" + format_table(rows))
    if args.out:
        append_results(args.out, "switchboard.py", argv, _markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
