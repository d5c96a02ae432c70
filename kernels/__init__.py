"""Fused Triton loss kernels for distillation, usable by any training stack (no dependency on `engine`).

Layout: one file per op family, each in the same order (module docstring with the forward and gradient math →
private `@triton.jit` kernels → launcher → row-level dispatch → `autograd.Function` → public function → Module),
and one naming ladder per family that no two layers share:

    distill.py        _kd_ce_fwd_kernel → kd_ce_fwd → kd_ce_rows → KDCELossFunction → distill_loss → DistillLoss
    kd.py             KD alone on the same kernel:                             kd_loss → KDLoss
    cross_entropy.py  CE alone on the same kernel: CrossEntropyLossFunction → cross_entropy → CrossEntropyLoss
    softmax.py        _softmax_{fwd,bwd}_kernel → softmax_{fwd,bwd} → softmax_rows(_backward) → SoftmaxFunction
                      → softmax, log_softmax → Softmax, LogSoftmax
    cosine.py         _cosine_fwd_kernel → cosine_fwd → cosine_rows → CosineLossFunction → cosine_loss → CosineLoss
    fused_linear.py   LM-head-fused losses: fused_linear_distill_fwd → FusedLinearDistillLossFunction
                      → fused_linear_distill_loss, fused_linear_cross_entropy → FusedLinear{Distill,CrossEntropy}Loss
    sparse_kd.py      KD+CE against stored top-K teacher targets (a teacher cache): _sparse_kd_ce_fwd_kernel
                      → sparse_kd_ce_fwd → sparse_kd_ce_rows → SparseKDCELossFunction → sparse_distill_loss
                      → SparseDistillLoss; sparse_targets makes the targets from teacher logits
    reference.py      the pure-PyTorch references (the contracts, the CPU path, the tests' oracle); the sparse op's
                      is reference_sparse.py

and what they share, in private modules: `_contract` (the one input checker), `_dispatch` (where an op runs and the
dtypes the kernels take), `_tiles` (the launch heuristics and the rounding store), `_grad` (the backward of every loss
that forms its gradient in the forward), `_kd_ce` (what the dense and the sparse KD+CE families share: the CE row and
its gradient, the row setup, the launch buffers, the weights → scales of their Functions).

Note: `kernels.softmax` and `kernels.cross_entropy` are the functions (re-exported here), which shadow the submodules
of the same names as attributes; reach the modules with `importlib.import_module("kernels.softmax")` or
`from kernels.softmax import ...`.
"""

from kernels.cosine import CosineLoss, cosine_loss
from kernels.cross_entropy import CrossEntropyLoss, cross_entropy
from kernels.distill import DistillLoss, DistillLossOutput, distill_loss, kd_ce_rows
from kernels.fused_linear import (
    FusedLinearCrossEntropyLoss,
    FusedLinearDistillLoss,
    fused_linear_cross_entropy,
    fused_linear_distill_loss,
)
from kernels.kd import KDLoss, kd_loss
from kernels.softmax import LogSoftmax, Softmax, log_softmax, softmax
from kernels.sparse_kd import SparseDistillLoss, SparseTargets, sparse_distill_loss, sparse_kd_ce_rows, sparse_targets

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
    "SparseDistillLoss",
    "SparseTargets",
    "cosine_loss",
    "cross_entropy",
    "distill_loss",
    "fused_linear_cross_entropy",
    "fused_linear_distill_loss",
    "kd_ce_rows",
    "kd_loss",
    "log_softmax",
    "softmax",
    "sparse_distill_loss",
    "sparse_kd_ce_rows",
    "sparse_targets",
]
