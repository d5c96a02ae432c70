"""Fused Triton loss kernels for distillation, usable by any training stack (no dependency on `engine`).

Note: `kernels.softmax` is the function (re-exported here), which shadows the submodule of the same name as an
attribute; reach the module with `importlib.import_module("kernels.softmax")` or `from kernels.softmax import ...`.
"""

from kernels.cosine import CosineLoss, cosine_loss
from kernels.distill import (
    CrossEntropyLoss,
    DistillLoss,
    DistillLossOutput,
    KDLoss,
    cross_entropy,
    distill_loss,
    kd_ce_rows,
    kd_loss,
)
from kernels.fused_linear import (  # LM-head-fused losses (issue #4)
    FusedLinearCrossEntropyLoss,
    FusedLinearDistillLoss,
    fused_linear_cross_entropy,
    fused_linear_distill_loss,
)
from kernels.softmax import LogSoftmax, Softmax, log_softmax, softmax

__all__ = [
    "CosineLoss",
    "CrossEntropyLoss",
    "DistillLoss",
    "DistillLossOutput",
    "FusedLinearCrossEntropyLoss",
    "FusedLinearDistillLoss",
    "KDLoss",
    "LogSoftmax",
    "Softmax",
    "cosine_loss",
    "cross_entropy",
    "distill_loss",
    "fused_linear_cross_entropy",
    "fused_linear_distill_loss",
    "kd_ce_rows",
    "kd_loss",
    "log_softmax",
    "softmax",
]
