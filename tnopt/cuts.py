"""`tnopt inspect --cuts`: how much of each Conv kernel's norm every SVD cut keeps at 2x/4x/8x.

For each candidate Conv (group 1) and each cut (O|Ikk, I|Okk, Okh|Ikw), the rank that stores the
kernel in 2, 4 or 8 times fewer parameters and the fraction of its Frobenius norm kept there
(sqrt of the kept singular-value energy). The math lives in `passes/cut.py`; this only formats.
"""

from __future__ import annotations

import json

from tnopt.errors import EXIT_OK
from tnopt.passes.cut import CUT_LABELS, CUTS, cut_profile, cut_shape
from tnopt.report import format_table

FACTORS = (2, 4, 8)


def cut_records(layers) -> tuple[list[dict], list[str]]:
    """One record per (Conv layer, cut); plus a line for each Conv layer left out, with the reason."""
    records, left_out = [], []
    for layer in layers:
        if layer.op != "Conv":
            continue
        if not layer.candidate or layer.weight is None:
            left_out.append(f"{layer.name}: {layer.skip_reason}")
            continue
        if layer.group != 1:
            left_out.append(f"{layer.name}: grouped Conv (group={layer.group}); the cuts need group=1")
            continue
        for cut in CUTS:
            if cut == "spatial" and layer.weight.ndim != 4:
                continue
            profile = cut_profile(layer.weight, cut, FACTORS)
            records.append(
                {
                    "layer": layer.name,
                    "kernel": list(layer.weight_shape),
                    "cut": CUT_LABELS[cut],
                    "method": f"cut-{cut}",
                    "matrix": list(cut_shape(layer.weight_shape, cut)),
                    "kept": {str(f): {"rank": r, "norm_fraction": kept} for f, (r, kept) in profile.items()},
                }
            )
    return records, left_out


def cut_table(layers, as_json: bool = False) -> int:
    records, left_out = cut_records(layers)
    if as_json:
        print(json.dumps(records, indent=2))
        return EXIT_OK
    rows = [("layer", "kernel", "cut", "matrix") + tuple(f"{f}x fewer params" for f in FACTORS)]
    for record in records:
        cells = []
        for f in FACTORS:
            kept = record["kept"][str(f)]
            cells.append("-" if kept["rank"] is None else f"{kept['norm_fraction']:.3f} (r={kept['rank']})")
        rows.append(
            (
                record["layer"],
                "x".join(map(str, record["kernel"])),
                record["cut"],
                "x".join(map(str, record["matrix"])),
                *cells,
            )
        )
    if records:
        print(format_table(rows))
        print("\nnorm kept = ‖W_r‖/‖W‖ at the largest rank r with r·(m+n) ≤ m·n/f; '-': not even rank 1 fits")
    else:
        print("no Conv layer with group=1 to cut")
    for line in left_out:
        print(f"left out {line}")
    return EXIT_OK
