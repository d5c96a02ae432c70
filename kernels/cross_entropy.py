"""Hard-label cross-entropy on logits, like `torch.nn.functional.cross_entropy` on (N, V) logits.

Per row with logits s, label y and smoothing ε: ce = (1−ε)(lse(s) − s_y) + ε(lse(s) − mean_v s_v), gradient
q − (1−ε)·onehot(y) − ε/V with q = softmax(s). It is the single-pass kernel of `kernels.distill` run without a
teacher; this file adds what the KD+CE loss does not have: reduction 'none' (a per-row upstream gradient) and
'sum'.
"""

import torch
from torch.autograd.function import once_differentiable

from kernels import _contract as check
from kernels._grad import scale_grad_
from kernels.distill import flat_rows, kd_ce_rows, row_count


class CrossEntropyLossFunction(torch.autograd.Function):
    """Hard-label CE with label smoothing and reduction none/sum/mean; gradient made in forward."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, label_smoothing, reduction):
        n = row_count(labels != ignore_index, 0) if reduction == "mean" else 1.0
        _, ce_row, grad = kd_ce_rows(logits, None, labels, ce_scale=1.0 / n, label_smoothing=label_smoothing,
                                     ignore_index=ignore_index, compute_grad=ctx.needs_input_grad[0])  # fmt: skip
        ctx.save_for_backward(grad)
        ctx.per_row = reduction == "none"
        return ce_row if ctx.per_row else ce_row.sum() / n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        # reduction='none': row n of the stored gradient is ∂ce_row[n]/∂s, scaled by its own upstream gradient.
        return scale_grad_(grad, grad_loss), None, None, None, None


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:  # fmt: skip
    """Cross-entropy with hard labels, like `torch.nn.functional.cross_entropy` on (N, V) logits.

    Args:
        logits: (..., V) fp32/bf16/fp16. labels: (...) int, `ignore_index` rows count nowhere.
        label_smoothing: ε in [0, 1]. reduction: "mean" (over non-ignored rows), "sum" or "none".

    Returns:
        fp32: () for mean/sum, labels.shape for none. Unlike torch, a mean over no rows is 0, not NaN.
    """
    reduction = check.choice("reduction", reduction, ("mean", "sum", "none"))
    label_smoothing = check.real("label_smoothing", label_smoothing, 0.0, 1.0)
    s, flat_labels = flat_rows(logits, labels)
    out = CrossEntropyLossFunction.apply(s, flat_labels, ignore_index, label_smoothing, reduction)
    return out.reshape(labels.shape) if reduction == "none" else out


class CrossEntropyLoss(torch.nn.Module):
    """Module form of `cross_entropy`."""

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean"):
        super().__init__()
        self.ignore_index, self.label_smoothing, self.reduction = ignore_index, label_smoothing, reduction

    def forward(self, logits, labels) -> torch.Tensor:
        return cross_entropy(logits, labels, self.ignore_index, self.label_smoothing, self.reduction)
