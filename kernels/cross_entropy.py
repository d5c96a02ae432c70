"""Hard-label cross-entropy on logits, like `torch.nn.functional.cross_entropy` on (N, V) logits.

Per row with logits s, label y and smoothing ε: ce = (1−ε)(lse(s) − s_y) + ε(lse(s) − mean_v s_v), gradient
q − (1−ε)·onehot(y) − ε/V with q = softmax(s). It is the single-pass kernel of `kernels.distill` run without a
teacher; this file adds what the KD+CE loss does not have: reduction 'none' (a per-row upstream gradient) and
'sum'.
"""

import torch
from torch.autograd.function import once_differentiable

from kernels import _contract as check
from kernels._grad import grad_scale_for, scale_grad_
from kernels._kd_ce import flat_rows, row_count
from kernels.distill import kd_ce_rows


class CrossEntropyLossFunction(torch.autograd.Function):
    """Hard-label CE with label smoothing and reduction none/sum/mean; gradient made in forward."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, label_smoothing, reduction):
        n = row_count(labels != ignore_index, 0) if reduction == "mean" else 1.0
        k = grad_scale_for(logits.dtype, 1.0 / n)  # fp16: stored as K·grad (see kernels._grad)
        _, ce_row, grad = kd_ce_rows(logits, None, labels, ce_scale=k / n, label_smoothing=label_smoothing,
                                     ignore_index=ignore_index, compute_grad=ctx.needs_input_grad[0])  # fmt: skip
        ctx.save_for_backward(grad)
        ctx.per_row, ctx.grad_scale = reduction == "none", k
        return ce_row if ctx.per_row else ce_row.sum() / n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        # reduction='none': row n of the stored gradient is ∂ce_row[n]/∂s, scaled by its own upstream gradient.
        return scale_grad_(grad, grad_loss, ctx.grad_scale), None, None, None, None


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:  # fmt: skip
    """Cross-entropy with hard labels, like `torch.nn.functional.cross_entropy` on (N, V) logits.

    Args:
        logits: (..., V) fp32/bf16/fp16 (fp64 runs the reference), V ≥ 1.
        labels: (...) int, logits.shape[:-1]; `ignore_index` rows count nowhere. A label outside [0, V) that is
            not `ignore_index` gives NaN for its row (and the mean or sum) and a NaN gradient row, where torch
            raises or asserts on the device.
        label_smoothing: ε in [0, 1]. reduction: "mean" (over non-ignored rows), "sum" or "none".

    Returns:
        fp32: () for mean/sum, labels.shape for none. Unlike torch, a mean over no rows is 0, not NaN.

    Raises:
        ValueError naming the argument, for inputs outside this contract (checked on the host, no device sync).
    """
    check.logits("logits", logits)
    check.tensor("labels", labels, "int", shape=logits.shape[:-1], device=logits.device)
    ignore_index = check.integer("ignore_index", ignore_index)
    reduction = check.choice("reduction", reduction, ("mean", "sum", "none"))
    label_smoothing = check.real("label_smoothing", label_smoothing, 0.0, 1.0)
    s, flat_labels = flat_rows(logits, labels)
    if torch.compiler.is_compiling():  # one registered op for torch.compile (kernels._library); eager never comes here
        from kernels import _library

        out = _library.cross_entropy(s, flat_labels, ignore_index, label_smoothing, reduction)
    else:
        out = CrossEntropyLossFunction.apply(s, flat_labels, ignore_index, label_smoothing, reduction)
    return out.reshape(labels.shape) if reduction == "none" else out


class CrossEntropyLoss(torch.nn.Module):
    """Module form of `cross_entropy`."""

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean"):
        super().__init__()
        self.ignore_index = check.integer("ignore_index", ignore_index)
        self.label_smoothing = check.real("label_smoothing", label_smoothing, 0.0, 1.0)
        self.reduction = check.choice("reduction", reduction, ("mean", "sum", "none"))

    def forward(self, logits, labels) -> torch.Tensor:
        return cross_entropy(logits, labels, self.ignore_index, self.label_smoothing, self.reduction)
