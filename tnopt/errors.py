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
