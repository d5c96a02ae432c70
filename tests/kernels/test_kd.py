"""KD alone (kernels/kd.py) against KLDivLoss(batchmean)·T², both paths."""

import torch
import torch.nn.functional as F

from kernels import DistillLoss, KDLoss, kd_loss
from tests.kernels.common import make_rows
from tests.kernels.tolerances import TOL, assert_grad_close


def test_kd_loss_matches_kl_div(impl):
    s, t, _, m = make_rows(23, 517, torch.float32, impl)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    ours = kd_loss(s1, t, m, temperature=2.0)
    ref = F.kl_div(F.log_softmax(s2[m] / 2, -1), F.softmax(t[m] / 2, -1), reduction="batchmean") * 4
    (ours * 3.0).backward()
    (ref * 3.0).backward()
    torch.testing.assert_close(ours, ref, **TOL[torch.float32])
    assert_grad_close(s1.grad, s2.grad)
    torch.testing.assert_close(KDLoss(2.0)(s, t, m), ref.detach(), **TOL[torch.float32])
    torch.testing.assert_close(DistillLoss(2.0, 1.0, 0.0)(s, t, None, m).loss, ref.detach(), **TOL[torch.float32])
