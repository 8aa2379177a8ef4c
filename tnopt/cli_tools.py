"""`tnopt inspect MODEL` and `tnopt compare A B`: the read-only subcommands of the CLI."""

from __future__ import annotations

import json
import sys

from tnopt.cli import _Parser
from tnopt.errors import EXIT_OK


def inspect_command(argv) -> int:
    from tnopt import io
    from tnopt.analyze import analyze
    from tnopt.report import format_table

    p = _Parser(prog="tnopt inspect", description="List the layers tnopt can factorize.")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--cuts", action="store_true", help="per Conv layer: kernel norm kept per cut at 2x/4x/8x")
    args = p.parse_args(argv)
    model = io.load_model(args.model)
    layers = analyze(model)
    if args.cuts:
        from tnopt.cuts import cut_table

        return cut_table(layers, as_json=args.json)
    if args.json:
        print(json.dumps([layer.to_dict() for layer in layers], indent=2))
        return EXIT_OK
    rows = [("name", "op", "weight", "params", "FLOPs", "status")]
    for layer in layers:
        rows.append(
            (
                layer.name,
                layer.op,
                "x".join(map(str, layer.weight_shape)),
                f"{layer.params:,}",
                f"{layer.flops:,}",
                "candidate" if layer.candidate else f"skip: {layer.skip_reason}",
            )
        )
    print(format_table(rows))
    n = sum(layer.candidate for layer in layers)
    print(f"\n{n} candidate layer(s) of {len(layers)}; FLOPs at inferred shapes with symbolic dims = 1")
    from tnopt.metric_choice import describe_default

    for line in describe_default(model):
        print(line)
    return EXIT_OK


def compare_command(argv) -> int:
    from tnopt import io
    from tnopt.data import input_specs, random_inputs
    from tnopt.metric_choice import add_output_figures
    from tnopt.metrics import fidelity_report
    from tnopt.pipeline import load_data, summarize
    from tnopt.report import Report, format_table
    from tnopt.runtime import Runtime

    p = _Parser(prog="tnopt compare", description="Compare two models' outputs and sizes.")
    p.add_argument("reference")
    p.add_argument("candidate")
    p.add_argument("--data")
    p.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto")
    args = p.parse_args(argv)
    from tnopt import validate

    if args.data is not None:
        validate.check_data_source(args.data)
    a, b = io.load_model(args.reference), io.load_model(args.candidate)
    for model in (a, b):
        validate.check_model_outputs(model)
    data = load_data(args.data, a) if args.data else random_inputs(input_specs(a), 64)
    if data.synthetic:
        print(
            f"warning: no --data: compared on {len(data)} seeded random inputs; only agreement, cosine "
            "and rel-l2 mean anything on them",
            file=sys.stderr,
        )
    runtime = Runtime(args.provider)
    reference, outputs = runtime.run(a, data.inputs), runtime.run(b, data.inputs)
    # FLOPs at the data's shapes (a fully convolutional model's symbolic H, W would count as 1), sizes
    # on disk (the loaded models carry the shapes inferred at load), and the same per-output figures
    # as a run's validation table (the generic agreement only where the first output is a classifier).
    sa, sb = summarize(a, data.inputs), summarize(b, data.inputs)
    figures = Report(args.reference, runtime.provider_name, sa)
    figures.metrics.update(fidelity_report(reference, outputs, data.labels))
    add_output_figures(figures, a, reference, outputs, None, lambda message: print(message, file=sys.stderr))
    bytes_a, bytes_b = io.bytes_on_disk(args.reference), io.bytes_on_disk(args.candidate)
    rows = [
        ("", "reference", "candidate"),
        ("params", f"{sa.params:,}", f"{sb.params:,}"),
        ("FLOPs", f"{sa.flops:,}", f"{sb.flops:,}"),
        ("file bytes", f"{bytes_a:,}", f"{bytes_b:,}"),
    ]
    rows += [(k, "", f"{v:.4f}") for k, v in figures.metrics.items() if not k.endswith("_original")]
    print(format_table(rows))
    return EXIT_OK
