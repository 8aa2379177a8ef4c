"""tnopt: compress ONNX models by tensor-network factorization of their weights, under an accuracy
budget checked in onnxruntime."""

from tnopt import errors
from tnopt.config import RunConfig
from tnopt.pipeline import compress
from tnopt.report import Report

__all__ = ["compress", "errors", "Report", "RunConfig"]
__version__ = "0.1.0"
