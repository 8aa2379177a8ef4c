"""The run configuration: every option of one compression run, validated once, frozen, passed down.

The CLI and the Python API build a `RunConfig` (the API's keywords are its fields); nothing below
reads options from anywhere else. Method options (the MPO cores) make the run's own method table
(`config.methods`): configured copies of the registry's methods, so no run changes another's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from tnopt.data import parse_batch_axes
from tnopt.errors import TnoptError
from tnopt.passes import METHODS, Method
from tnopt.passes.mpo import MPO

OBJECTIVES = ("flops", "params", "latency")
# How the budgeted search estimates sensitivities: tnopt/predict.py or tnopt/sweep.py.
SENSITIVITIES = ("auto", "predicted", "measured")
DEFAULT_SENSITIVITY = "auto"


@dataclass(frozen=True)
class MethodOptions:
    """Options of individual methods; None keeps each method's default."""

    mpo_cores: int | None = None

    def table(self) -> dict[str, Method]:
        """Name → Method for one run: the registry's instances, configured copies where set."""
        table = dict(METHODS)
        if self.mpo_cores is not None:
            table["mpo"] = MPO(cores=self.mpo_cores, mode="compute")
            table["mpo-storage"] = MPO(cores=self.mpo_cores, mode="storage")
        return table

    @property
    def cache_tag(self) -> str:
        """What the methods' options add to the sensitivity cache's key."""
        return f"-mpo{self.mpo_cores}" if self.mpo_cores else ""


@dataclass(frozen=True)
class RunConfig:
    """Exactly one rank rule applies: `budget` (budgeted search), `ranks` (layer name → rank, or →
    (method, rank) to choose the method per layer), `energy` (keep that fraction of singular-value
    energy) or `rank_ratio` (fraction of full rank; 0.5 when nothing is given). `allow_growth`
    rewrites layers even where the factorized form has more parameters than the dense layer (used to
    test exactness at full rank). `data_aware` (whitened factors from calibration moments) and
    `correct` (sequential least-squares refit of each layer's last factor) default to on when real
    data is given, off on random inputs. `mpo_cores` sets the MPO methods' number of cores for this
    run; `min_layer_params` and `exclude` (a regular expression on node names) leave layers dense,
    with that reason reported. `heal` (steps, True or a `tnopt.heal.HealConfig`) trains the
    rewritten layers' factors by distillation; with a budget, plans are judged after healing.
    `batch_axes` overrides the batch axes read from the model's symbolic dims; `latency_batch` times
    the whole model before and after at that batch."""

    methods: str | list[str] | tuple[str, ...] | None = None
    rank_ratio: float | None = None
    energy: float | None = None
    ranks: dict | None = field(default=None, hash=False)
    budget: object = None
    data: object = field(default=None, repr=False, hash=False, compare=False)
    eval_data: object = field(default=None, repr=False, hash=False, compare=False)
    metric: str | Callable | None = None
    provider: str = "auto"
    objective: str = "flops"
    cache_dir: str | None = None
    seed: int = 0
    progress: bool = False
    latency_guard: bool | None = None
    data_aware: bool | None = None
    correct: bool | None = None
    allow_growth: bool = False
    mpo_cores: int | None = None
    min_layer_params: int = 0
    exclude: str | None = None
    # Healing (tnopt.heal): None, True, a step count, or a HealConfig.
    heal: object = field(default=None, hash=False, compare=False)
    # Input name → batch axis (None: fed whole), or ["NAME:AXIS", …] (--batch-axis); default: read
    # from the model's symbolic dims (tnopt.data.infer_batch_axes).
    batch_axes: object = field(default=None, hash=False)
    # Time the whole model before and after at this batch (--latency-batch); None/0: not timed.
    latency_batch: int | None = None
    # "predicted" (local errors calibrated on a subsample), "measured" (one whole-model run per
    # candidate) or "auto" (measured where its projected ORT work is small, tnopt.predict.
    # choose_sensitivity): how the budgeted search gets each candidate's sensitivity.
    sensitivity: str = DEFAULT_SENSITIVITY
    # Why "auto" chose what it chose (filled by the pipeline; "" when the mode was given).
    sensitivity_reason: str = field(default="", compare=False)
    # Seconds from the start of the run after which the budgeted search stops and keeps the best
    # plan it has verified so far (--time-limit); None: no limit.
    time_limit: float | None = None
    # Derived, filled by __post_init__: the selected method names and the run's method table.
    method_names: tuple[str, ...] = field(init=False, default=(), compare=False)
    method_table: dict = field(init=False, default=None, repr=False, hash=False, compare=False)
    exclude_pattern: re.Pattern | None = field(init=False, default=None, repr=False, compare=False)
    heal_config: object = field(init=False, default=None, repr=False, compare=False)

    def __post_init__(self):
        # Every option (and data file) checked once, before any model is read: one line, exit 2.
        from tnopt.validate import check_run_options

        check_run_options(
            methods=self.methods,
            rank_ratio=self.rank_ratio,
            energy=self.energy,
            ranks=self.ranks,
            budget=self.budget,
            data=self.data,
            eval_data=self.eval_data,
            metric=self.metric,
            provider=self.provider,
            objective=self.objective,
            cache_dir=self.cache_dir,
            seed=self.seed,
            mpo_cores=self.mpo_cores,
            min_layer_params=self.min_layer_params,
            exclude=self.exclude,
            time_limit=self.time_limit,
        )
        try:
            pattern = re.compile(self.exclude) if self.exclude else None
        except re.error as exc:
            raise TnoptError(f"--exclude {self.exclude!r} is not a regular expression ({exc})") from None
        if self.mpo_cores is not None and int(self.mpo_cores) < 2:
            raise TnoptError(f"--mpo-cores must be at least 2, got {self.mpo_cores}")
        if self.objective not in OBJECTIVES:
            raise TnoptError(f"unknown objective {self.objective!r}; choose {', '.join(OBJECTIVES)}")
        if self.sensitivity not in SENSITIVITIES:
            raise TnoptError(
                f"--sensitivity {self.sensitivity!r}: choose "
                f"{', '.join(SENSITIVITIES[:-1])} or {SENSITIVITIES[-1]}"
            )
        if self.latency_batch is not None and int(self.latency_batch) < 0:
            raise TnoptError(f"--latency-batch must be 0 or more, got {self.latency_batch}")
        object.__setattr__(self, "batch_axes", parse_batch_axes(self.batch_axes))
        object.__setattr__(self, "exclude_pattern", pattern)
        object.__setattr__(self, "method_names", tuple(resolve_methods(self.methods)))
        object.__setattr__(self, "method_table", self.method_options.table())
        from tnopt.heal_budget import config_from

        object.__setattr__(self, "heal_config", config_from(self.heal, self.seed))

    @property
    def method_options(self) -> MethodOptions:
        return MethodOptions(mpo_cores=None if self.mpo_cores is None else int(self.mpo_cores))

    def check_rank_rule(self) -> None:
        """The fixed-rank rules' values (the budgeted search ignores them)."""
        if sum(x is not None for x in (self.rank_ratio, self.energy, self.ranks)) > 1:
            raise TnoptError("give only one of --rank-ratio, --energy, ranks")
        if self.rank_ratio is not None and not 0 < self.rank_ratio <= 1:
            raise TnoptError(f"--rank-ratio must be in (0, 1], got {self.rank_ratio}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise TnoptError(f"--energy must be in (0, 1], got {self.energy}")


def resolve_methods(methods: str | list[str] | tuple[str, ...] | None) -> list[str]:
    if methods in (None, "auto"):
        return [name for name, method in METHODS.items() if method.in_auto]
    names = methods.split(",") if isinstance(methods, str) else list(methods)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise TnoptError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)} or auto")
    return names
