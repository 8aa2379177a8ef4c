"""Command line: `tnopt MODEL -o OUT`, `tnopt inspect MODEL`, `tnopt compare A B`.

Every error caused by the input prints one line `tnopt: error: …` and exits 2; a search that misses
its budget saves its best model and exits 3; tnopt's own failures print one line `tnopt: internal
error: …` and exit 4 (the traceback only with --debug).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings

from tnopt.config import DEFAULT_SENSITIVITY, SENSITIVITIES
from tnopt.errors import (
    EXIT_BAD_INPUT,
    EXIT_BUDGET_MISSED,
    EXIT_INTERNAL,
    EXIT_OK,
    InternalError,
    TnoptError,
)

SUBCOMMANDS = ("inspect", "compare")
DEBUG_FLAG = "--debug"
_DEFAULT_HEAL_STEPS = 300


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors also exit 2 with one line
        self.exit(EXIT_BAD_INPUT, f"tnopt: error: {message}\n")


def compress_parser():
    from tnopt.passes import METHODS

    p = _Parser(
        prog="tnopt",
        description="Compress an ONNX model by factorizing its Conv/Gemm/MatMul weights.",
        epilog="Other commands: `tnopt inspect MODEL`, `tnopt compare A B`.",
    )
    p.add_argument("model", help="input .onnx (never modified)")
    p.add_argument("-o", "--output", required=True, help="output .onnx (written atomically)")
    p.add_argument(
        "--method",
        "--methods",
        dest="methods",
        default="auto",
        help=f"auto or a comma list of: {', '.join(METHODS)}",
    )
    p.add_argument("--list-methods", action="store_true", help=argparse.SUPPRESS)
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--rank-ratio", type=float, help="keep this fraction of each layer's full rank")
    rule.add_argument("--energy", type=float, help="keep this fraction of singular-value energy")
    rule.add_argument(
        "--budget", help="allowed metric drop: 1%%, 1pp or 0.01 (one point); needs --data (budgeted search)"
    )
    rule.add_argument("--max-drop", dest="budget", help="same as --budget")
    p.add_argument(
        "--drop-type",
        choices=("absolute", "relative"),
        default="absolute",
        help="absolute: the budget is points of the metric (1%% = 0.01); relative: a fraction of the "
        "original's value (default absolute)",
    )
    p.add_argument(
        "--metric",
        help="top1 | agreement | cosine | rel-l2 | fidelity | detection | ctc | segmentation | embedding, "
        "options after a colon (detection:iou=0.5,conf=0.25), or a plug-in package.module:function "
        "(fn(reference_outputs, outputs, labels) -> score or per-sample scores, higher is better). "
        "Default: top1 with labels; agreement for classifiers; the task's own metric for a recognised "
        "YOLO-style detector (detection), CTC recognizer (ctc) or Sigmoid probability map (map IoU); else "
        "fidelity (worst channel group). The run's first lines say which and why",
    )
    p.add_argument(
        "--metric-outputs", help="comma list of the outputs the metric and guard count (default: all)"
    )
    p.add_argument(
        "--output-spec",
        action="append",
        default=[],
        help="per-output channel groups: NAME:axis=K or NAME:groups=0-3,4- (repeatable)",
    )
    p.add_argument("--objective", choices=("params", "flops", "latency"), default="flops")
    p.add_argument(
        "--sensitivity",
        choices=SENSITIVITIES,
        default=None,
        help="how the search estimates each candidate's loss: predicted (local error from the "
        "calibration moments, calibrated by a few whole-model runs on a subsample), measured (a "
        "whole-model run per layer, method and rank) or auto (measured unless its projected work, "
        f"candidates x sweep samples x model FLOPs, is large); default {DEFAULT_SENSITIVITY}",
    )
    p.add_argument(
        "--no-latency-guard",
        action="store_true",
        help="apply rewrites even where the runtime does not run them faster",
    )
    p.add_argument(
        "--no-data-aware",
        action="store_true",
        help="weight-only factors (default with --data: whitened by the calibration moments)",
    )
    p.add_argument(
        "--no-correct",
        action="store_true",
        help="skip the sequential least-squares refit of each layer's last factor",
    )
    p.add_argument(
        "--allow-growth",
        action="store_true",
        help="apply rewrites even where they do not shrink the layer (testing exactness at full rank)",
    )
    p.add_argument("--mpo-cores", type=int, help="tensor-train cores of the mpo methods (default 3)")
    p.add_argument("--min-layer-params", type=int, default=0, help="leave layers with fewer parameters dense")
    p.add_argument("--exclude", help="leave layers whose node name matches this regular expression dense")
    p.add_argument("--data", help=".npz with arrays keyed by input name (+ optional 'labels')")
    p.add_argument("--eval-data", help="disjoint .npz for the final metric (default: a split of --data)")
    p.add_argument(
        "--batch-axis",
        action="append",
        default=[],
        metavar="NAME:AXIS",
        help="the batch axis of input NAME (an integer, or 'none': fed whole to every batch); "
        "default: read from the model's symbolic dims",
    )
    p.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--latency-batch",
        type=int,
        default=1,
        help="time the whole model before and after at this batch (0: skip); default 1",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        metavar="SECONDS",
        help="with --budget: stop the search after SECONDS (from the start of the run) and save the best "
        "plan verified so far; exit 3 when none was verified within the budget",
    )
    p.add_argument(
        "--cache", default=None, help="directory for cached sensitivities (default ~/.cache/tnopt)"
    )
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--heal",
        type=int,
        nargs="?",
        const=_DEFAULT_HEAL_STEPS,
        metavar="STEPS",
        help="train the rewritten layers' factors to reproduce the original's outputs (distillation; "
        f"default {_DEFAULT_HEAL_STEPS} steps); with --budget, plans are judged after healing",
    )
    p.add_argument(
        "--augment",
        help="with --heal: flip, crop and/or mixup (each image blended with another, the original "
        "labelling the blend) the calibration images while healing, e.g. flip,crop",
    )
    p.add_argument(
        "--heal-path",
        choices=("auto", "graph", "block"),
        default="auto",
        help="whole graph in torch, or layer by layer on captured activations "
        "(auto: the whole graph when it converts)",
    )
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--plot", help="write the search plot (PNG) here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or tables")
    p.add_argument(DEBUG_FLAG, action="store_true", help="print the traceback of an internal error")
    p.add_argument("--version", action="version", version=f"tnopt {_version()}")
    return p


def _version() -> str:
    from tnopt import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    try:
        if argv and argv[0] == "--version":
            print(f"tnopt {_version()}")
            return EXIT_OK
        if argv and argv[0] == "--list-methods":
            return _list_methods()
        if argv and argv[0] in SUBCOMMANDS:
            rest = [a for a in argv[1:] if a != DEBUG_FLAG]
            from tnopt import cli_tools

            return {"inspect": cli_tools.inspect_command, "compare": cli_tools.compare_command}[argv[0]](rest)
        return _compress(argv)
    except TnoptError as exc:
        print(f"tnopt: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("tnopt: interrupted; nothing written", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`tnopt inspect --json | head`): what it read is all it wanted.
        _silence_stdout()
        return EXIT_OK
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 — anything else is tnopt's own failure
        if debug:
            traceback.print_exc()
        described = exc if isinstance(exc, InternalError) else f"{type(exc).__name__}: {exc}"
        hint = "" if debug else " (rerun with --debug for the traceback)"
        print(f"tnopt: internal error: {_one_line(described)}{hint}", file=sys.stderr)
        return EXIT_INTERNAL


def _one_line(message) -> str:
    lines = str(message).strip().splitlines()
    return lines[0] if lines else type(message).__name__


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _list_methods() -> int:
    from tnopt.passes import METHODS

    for name, method in METHODS.items():
        doc = (sys.modules[type(method).__module__].__doc__ or "").strip().splitlines()
        # A variant registered beside its module's main method says what sets it apart.
        summary = getattr(method, "summary", None) or (doc[0] if doc else "")
        print(f"{name:10s} {', '.join(method.op_types):16s} {summary}")
    return EXIT_OK


def _compress(argv) -> int:
    from tnopt import allocator, io, validate
    from tnopt.graph import rewritten_layers
    from tnopt.pipeline import compress
    from tnopt.runtime import Runtime

    args = compress_parser().parse_args(argv)
    if args.list_methods:
        return _list_methods()
    # Every path before any work: a report or plot that cannot be written must not cost a run,
    # nor leave the model behind with exit 2.
    validate.check_cli_paths(args.model, args.output, args.report, args.plot)
    # The command owns its process: freed large arrays go back to the system (tnopt/allocator.py;
    # ResNet-50's row kept gigabytes of them resident).
    allocator.return_freed_memory()
    heal = _heal_config(args)
    metric = _metric_request(args)
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    cache = None if args.no_cache else (args.cache or _default_cache())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pipeline's warnings reach the user through `say` and the report
        model, report = compress(
            args.model,
            methods=args.methods,
            rank_ratio=args.rank_ratio,
            energy=args.energy,
            budget=args.budget
            if args.budget is None
            else {"max_drop": args.budget, "drop_type": args.drop_type},
            data=args.data,
            eval_data=args.eval_data,
            metric=metric,
            provider=args.provider,
            objective=args.objective,
            cache_dir=cache,
            seed=args.seed,
            progress=not args.quiet,
            latency_guard=not args.no_latency_guard,
            data_aware=False if args.no_data_aware else None,
            correct=False if args.no_correct else None,
            allow_growth=args.allow_growth,
            mpo_cores=args.mpo_cores,
            min_layer_params=args.min_layer_params,
            exclude=args.exclude,
            log=say,
            heal=heal,
            batch_axes=args.batch_axis,
            latency_batch=args.latency_batch,
            sensitivity=args.sensitivity or DEFAULT_SENSITIVITY,
            time_limit=args.time_limit,
        )
    runtime = Runtime(args.provider)
    # An input with external data gets an output with external data (OUT.data beside OUT).
    external = bool(io.external_data_files(args.model))
    if not external and not rewritten_layers(model):
        # Nothing rewritten: the file given is the answer, byte for byte.
        report.after.file_bytes = io.copy_model_atomic(
            args.model, args.output, verify_session=runtime.verify_loads
        )
        say("nothing was rewritten: the output is the input file unchanged")
    else:
        report.after.file_bytes = io.save_model_atomic(
            model, args.output, verify_session=runtime.verify_loads, external_data=external
        )
    report.before.file_bytes = io.bytes_on_disk(args.model)
    report.run = {
        "tnopt_version": _version(),
        "command": ["tnopt", *argv],
        "input": {"path": args.model, "sha256": io.file_sha256(args.model)},
        "output": {"path": args.output, "sha256": io.file_sha256(args.output)},
    }
    try:
        if args.report:
            report.write_json(args.report)
        if args.plot and report.search:
            from tnopt.plot import plot_search

            plot_search(report, args.plot)
        elif args.plot:
            say("note: --plot draws the budgeted search; without --budget there is nothing to plot")
    except OSError as exc:
        raise TnoptError(
            f"model saved to {args.output}, but the report/plot could not be written ({exc})"
        ) from None
    if not args.quiet:
        print(report.layer_table())
        print()
        print(report.summary_table())
        if report.heal:
            print()
            print(report.heal_table())
        print(f"\nwrote {args.output} ({len(report.rewritten)} of {len(report.layers)} layers rewritten)")
        if report.budget_line():
            print(report.budget_line())
    if report.budget_met is False:
        print(
            f"tnopt: budget not met: saved the best model found to {args.output} "
            f"({report.search.get('miss_reason', '')})",
            file=sys.stderr,
        )
        return EXIT_BUDGET_MISSED
    return EXIT_OK


def _heal_config(args):
    """The healing options, validated before any work (None without --heal)."""
    from tnopt.heal import HealConfig, parse_augment

    if args.heal is None:
        if args.augment or args.heal_path != "auto":
            raise TnoptError("--augment and --heal-path need --heal")
        return None
    if args.heal < 1:
        raise TnoptError(f"--heal STEPS must be at least 1, got {args.heal}")
    if not args.data:
        raise TnoptError("--heal needs calibration data (--data): it distils the original on it")
    return HealConfig(
        steps=args.heal, seed=args.seed, augment=parse_augment(args.augment), path=args.heal_path
    )


def _metric_request(args):
    """--metric / --metric-outputs / --output-spec, parsed (and a plug-in imported) before any work."""
    from tnopt.task_metrics import MetricRequest, parse_output_spec

    if not (args.metric or args.metric_outputs or args.output_spec):
        return None
    outputs = None
    if args.metric_outputs is not None:
        outputs = [n.strip() for n in args.metric_outputs.split(",") if n.strip()]
    if args.metric_outputs is not None and not outputs:
        raise TnoptError("--metric-outputs needs at least one output name")
    options = dict(parse_output_spec(text) for text in args.output_spec)
    return MetricRequest(args.metric, outputs, options)


def _default_cache() -> str:
    import os

    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tnopt")


if __name__ == "__main__":
    sys.exit(main())
