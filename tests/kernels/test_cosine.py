"""Cosine loss on hidden states (kernels/cosine.py) against CosineEmbeddingLoss(target 1) and the fp64 truth."""

import math

import pytest
import torch
import torch.nn.functional as F

from kernels import CosineLoss, cosine_loss
from tests.kernels.tolerances import DTYPES, TOL, assert_accuracy_rule

# H below one block, BERT's 768, above one block (2048 fp32 / 4096 16-bit), not multiples of it.
SHAPES = [(1, 1), (3, 7), (4097, 7), (41, 768), (2, 5000)]


def make_rows(n, h, dtype, device):
    g = torch.default_generator  # seeded afresh on every run by the conftest
    t = torch.randn(n, h, generator=g)
    s = t + torch.randn(n, h, generator=g)  # correlated, so cos is far from 0
    mask = torch.rand(n, generator=g) < 0.7
    return s.to(dtype).to(device), t.to(dtype).to(device), mask.to(device)


def torch_loss(s, t, mask):
    """DistilBERT's L_cos: CosineEmbeddingLoss(reduction mean) with target 1 over the selected rows."""
    s_sel, t_sel = s[mask], t[mask]
    return F.cosine_embedding_loss(s_sel, t_sel, torch.ones(s_sel.shape[0], dtype=s.dtype, device=s.device))


def loss_and_grad(fn, s, t, mask, upstream):
    s = s.detach().clone().requires_grad_()
    loss = fn(s, t, mask)
    (loss * upstream).backward()
    return loss.detach(), s.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,h", SHAPES, ids=[f"{n}x{h}" for n, h in SHAPES])
def test_cosine_loss_accuracy(impl, n, h, dtype):
    s, t, mask = make_rows(n, h, dtype, impl)
    mask[0] = True  # at least one selected row, so torch's mean is defined
    upstream = 1.7  # non-unit upstream gradient
    ours = loss_and_grad(cosine_loss, s, t, mask, upstream)
    same = loss_and_grad(torch_loss, s, t, mask, upstream)
    truth = loss_and_grad(torch_loss, s.double(), t.double(), mask, upstream)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype
    torch.testing.assert_close(ours[0].double(), truth[0], atol=1e-6, rtol=1e-5)  # fp32 reductions for all dtypes
    # The gradient is a difference of two terms of size ~1/(‖s‖·#rows) each; with H = 1 it is 0 up to their rounding.
    term = upstream / (s.double().norm(dim=-1)[mask].min().item() * mask.sum().item())
    g_scale = max(truth[1].abs().max().item(), term)
    torch.testing.assert_close(ours[1].double(), truth[1], atol=TOL[dtype]["atol"] * g_scale, rtol=TOL[dtype]["rtol"])
    # 1 − cos lies in [0, 2]: its rounding is relative to 1, not to a loss that happens to be ~0 (H = 1, where
    # CosineEmbeddingLoss's own 1e-12 in the norms is all that separates it from 0).
    assert_accuracy_rule(ours[0], same[0], truth[0], dtype, "loss", scale=1.0)
    assert_accuracy_rule(ours[1], same[1], truth[1], dtype, "grad", scale=g_scale)


def test_matches_one_minus_cosine_similarity_without_mask(impl):
    s, t, _ = make_rows(9, 100, torch.float32, impl)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    ours = cosine_loss(s1.view(3, 3, 100), t.view(3, 3, 100))  # (B, L, H) flattens to rows
    ref = (1 - F.cosine_similarity(s2, t, dim=-1, eps=1e-8)).mean()
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref, **TOL[torch.float32])
    torch.testing.assert_close(s1.grad, s2.grad, **TOL[torch.float32])
    torch.testing.assert_close(CosineLoss()(s, t), ref.detach(), **TOL[torch.float32])


def test_no_selected_row_gives_zero(impl):
    s, t, _ = make_rows(5, 33, torch.bfloat16, impl)
    s1 = s.clone().requires_grad_()
    loss = cosine_loss(s1, t, torch.zeros(5, dtype=torch.bool, device=impl))
    loss.backward()
    assert loss.item() == 0.0 and (s1.grad == 0).all()


def test_norms_below_eps_follow_the_clamp(impl):
    """‖s‖ or ‖t‖ below eps: the norm is clamped to eps, as in torch's cosine_similarity; the clamp is constant, so
    for 0 < ‖s‖ < eps the loss 1 − s·t/(eps‖t‖) is linear in s with gradient −t/(eps‖t‖) (torch's autograd instead
    differentiates the unclamped norm there)."""
    s, t, _ = make_rows(4, 16, torch.float32, impl)
    s[0] = 0.0
    t[1] = 0.0
    s[2] = s[2] * 1e-10 / s[2].norm() * 0.5  # ‖s‖ = eps/2
    s1 = s.clone().requires_grad_()
    loss = cosine_loss(s1, t)
    loss.backward()
    ref = (1 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)).mean()
    torch.testing.assert_close(loss, ref, **TOL[torch.float32])
    assert torch.isfinite(s1.grad).all() and (s1.grad[1] == 0).all()
    linear = -t[[0, 2]] / (1e-8 * t[[0, 2]].norm(dim=-1, keepdim=True)) / 4
    torch.testing.assert_close(s1.grad[[0, 2]], linear, **TOL[torch.float32])


def test_non_contiguous_inputs(impl):
    s, t, mask = make_rows(6, 300, torch.float32, impl)
    wide = torch.zeros(6, 320, device=impl)
    wide[:, :300] = s
    ours = cosine_loss(wide[:, :300], t.t().contiguous().t(), torch.stack([mask, mask], 1)[:, 0])
    torch.testing.assert_close(ours, cosine_loss(s, t, mask), atol=1e-7, rtol=1e-6)


def test_teacher_that_requires_grad_is_an_error(impl):
    s, t, _ = make_rows(2, 8, torch.float32, impl)
    with pytest.raises(ValueError, match="teacher"):
        cosine_loss(s, t.requires_grad_())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy reports the NaN rows
@pytest.mark.parametrize("where", ["student_entry", "student_row", "teacher_entry", "student_inf"])
@pytest.mark.parametrize("h", [96, 5000], ids=["one-tile", "two-tiles"])
def test_nan_in_a_selected_row_gives_nan(impl, where, h):
    """A NaN norm must not be clamped to eps (max(NaN, eps) is eps on a GPU): NaN loss, NaN gradient row."""
    s, t, mask = make_rows(4, h, torch.float32, impl)
    mask[:] = True
    if where == "student_entry":
        s[1, 7] = math.nan
    elif where == "student_row":
        s[1] = math.nan
    elif where == "teacher_entry":
        t[1, 3] = math.nan
    else:
        s[1, 5] = math.inf
    x = s.clone().requires_grad_()
    loss = cosine_loss(x, t, mask)
    loss.backward()
    assert loss.isnan(), f"{where}: loss {loss.item()}"
    assert x.grad[1].isnan().all(), f"{where}: {x.grad[1].isnan().sum().item()} NaN of {h}, max {x.grad[1].max()}"
    assert torch.isfinite(x.grad[[0, 2, 3]]).all()
    mask[1] = False  # not selected: no effect
    x = s.clone().requires_grad_()
    loss = cosine_loss(x, t, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and (x.grad[1] == 0).all()
