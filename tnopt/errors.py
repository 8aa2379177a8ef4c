"""Errors a user can cause. The CLI prints each as one line and exits with EXIT_BAD_INPUT."""

EXIT_OK = 0
EXIT_BAD_INPUT = 2
# The search saved its best model but that model misses the accuracy budget.
EXIT_BUDGET_MISSED = 3


class TnoptError(Exception):
    """Base of every error caused by the input rather than by a bug in tnopt."""


class UnsupportedModelError(TnoptError):
    """The model cannot be loaded or has nothing tnopt can work on."""


class DataError(TnoptError):
    """Calibration or evaluation data does not fit the model."""


class ValidationError(TnoptError):
    """A produced model failed onnx.checker or an onnxruntime load."""


class OutputError(TnoptError):
    """The output path cannot be written."""


# tnopt's own failure (its emitted graph does not load, a numeric routine fails): not the user's fault.
EXIT_INTERNAL = 4


class InternalError(Exception):
    """A bug or numeric failure inside tnopt; names the layer and method where known.

    Deliberately not a TnoptError: the CLI reports it as "internal error" with its own exit code,
    never as the user's bad input.
    """

    def __init__(self, message: str, layer: str | None = None, method: str | None = None):
        where = ", ".join(part for part in (f"layer {layer}" if layer else "", method or "") if part)
        super().__init__(f"{message} ({where})" if where else message)
        self.layer = layer
        self.method = method
