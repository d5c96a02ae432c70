"""Temperature KD alone: T²·KL(softmax(t/T) ‖ softmax(s/T)) summed over V, averaged over KD rows.

This is DistilBERT's L_kd (KLDivLoss(batchmean) on log_softmax(s/T) and softmax(t/T), times T²). It is the
single-pass KD+CE kernel of `kernels.distill` run without labels (`KDCELossFunction` with ce_weight = 0), so its
derivation, gradient (∂/∂s = T (p_s − p_t) / #rows) and numerics are those documented there.
"""

import torch

from kernels import _contract as check
from kernels._kd_ce import flat_rows
from kernels.distill import KDCELossFunction, check_logits_rows


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, kd_mask: torch.Tensor | None = None,
    temperature: float = 2.0,
) -> torch.Tensor:  # fmt: skip
    """T²·KL(softmax(t/T) ‖ softmax(s/T)) summed over V, averaged over KD rows (KLDivLoss(batchmean)·T²).

    Args, dtypes and errors as `distill_loss`. Returns a () fp32 tensor, 0 when no row is selected.
    """
    temperature, _ = check_logits_rows(student_logits, teacher_logits, None, kd_mask, temperature, -100)
    s, kd_mask = flat_rows(student_logits, kd_mask)
    t, _ = flat_rows(teacher_logits, None)
    # loss = 1·kd + 0·ce with no labels: exactly kd.
    if torch.compiler.is_compiling():  # one registered op for torch.compile (kernels._library); eager never comes here
        from kernels import _library

        return _library.distill_loss(s, t, None, kd_mask, temperature, 1.0, 0.0, -100)[0]
    return KDCELossFunction.apply(s, t, None, kd_mask, temperature, 1.0, 0.0, -100)[0]


class KDLoss(torch.nn.Module):
    """Module form of `kd_loss`."""

    def __init__(self, temperature: float = 2.0):
        super().__init__()
        self.temperature = check.temperature(temperature)

    def forward(self, student_logits, teacher_logits, kd_mask=None) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, kd_mask, self.temperature)
