"""Hard-label cross-entropy (kernels/cross_entropy.py) against torch.nn.functional.cross_entropy, both paths."""

import pytest
import torch
import torch.nn.functional as F

from kernels import CrossEntropyLoss, cross_entropy
from tests.kernels.common import make_rows
from tests.kernels.tolerances import TOL, assert_grad_close


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_matches_torch(impl, reduction, eps):
    s, _, y, _ = make_rows(41, 1271, torch.float32, impl)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    ours = cross_entropy(s1, y, label_smoothing=eps, reduction=reduction)
    ref = F.cross_entropy(s2, y, label_smoothing=eps, reduction=reduction)
    upstream = torch.randn_like(ref)  # per row for 'none': each row's gradient must take its own factor
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(ours, ref, **TOL[torch.float32])
    assert_grad_close(s1.grad, s2.grad)
    module = CrossEntropyLoss(label_smoothing=eps, reduction=reduction)
    torch.testing.assert_close(module(s, y), ref.detach(), **TOL[torch.float32])


def test_cross_entropy_keeps_leading_dims(impl):
    s, _, y, _ = make_rows(6, 50, torch.float32, impl)
    ours = cross_entropy(s.view(2, 3, 50), y.view(2, 3), reduction="none")
    assert ours.shape == (2, 3)
    torch.testing.assert_close(ours.view(-1), F.cross_entropy(s, y, reduction="none"), **TOL[torch.float32])
