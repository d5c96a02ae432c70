"""Single-pass KD + CE (kernels/distill.py) against torch.nn.functional and the fp64 reference.

Every parity test runs on the Triton kernel (Triton's interpreter on CPU) and on the pure-PyTorch reference (the
`impl` fixture). Interpreter shapes stay small: wide vocabularies only with N ≤ 2, N = 4097 only with V = 7.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from kernels import cross_entropy, distill_loss, kd_ce_rows, kd_loss
from kernels.reference import kd_ce_rows_reference
from tests.kernels.common import NoHostSync, make_rows
from tests.kernels.tolerances import DTYPES, TOL, assert_accuracy_rule, assert_grad_close, max_err

# (N, V, T, ε): V = 1, below and above one block, not multiples of it; N = 4097 only with a tiny V.
SHAPES = [
    (1, 1, 1.0, 0.0),
    (3, 7, 2.0, 0.1),
    (4097, 7, 0.5, 0.0),
    (41, 1271, 5.0, 0.1),
    (2, 30522, 2.0, 0.0),
    (1, 50257, 1.0, 0.1),
    (2, 65537, 0.5, 0.0),
    (1, 262144, 2.0, 0.0),
]


def torch_rows(s, t, y, m, temperature, eps, kd_scale, ce_scale):
    """KD/CE rows and the weighted-sum gradient from torch.nn.functional, computed in the inputs' dtype."""
    s = s.detach().clone().requires_grad_()
    kd = F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1), reduction="none").sum(-1)
    kd = torch.where(m, kd * temperature**2, torch.zeros_like(kd))
    ce = F.cross_entropy(s, y, ignore_index=-100, label_smoothing=eps, reduction="none")
    (kd_scale * kd.sum() + ce_scale * ce.sum()).backward()
    return kd.detach(), ce.detach(), s.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,v,temperature,eps", SHAPES, ids=[f"{n}x{v}" for n, v, *_ in SHAPES])
def test_kd_ce_rows_accuracy(impl, n, v, temperature, eps, dtype):
    s, t, y, m = make_rows(n, v, dtype, impl)
    kd_scale, ce_scale = 0.7, torch.tensor(0.3, device=impl)  # a float and a () device tensor
    kd, ce, grad = kd_ce_rows(s, t, y, m, temperature, kd_scale, ce_scale, label_smoothing=eps)
    kd_t, ce_t, grad_t = kd_ce_rows_reference(s.double(), t.double(), y, m, temperature, kd_scale, 0.3, eps)
    assert kd.dtype == ce.dtype == torch.float32 and grad.dtype == dtype
    # Row losses come from fp32 reductions whatever the input dtype: fp32-level agreement with the fp64 truth.
    torch.testing.assert_close(kd.double(), kd_t, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ce.double(), ce_t, atol=1e-4, rtol=1e-5)
    # The gradient is rounded once to the student dtype.
    assert max_err(grad, grad_t) <= TOL[dtype]["rtol"] * grad_t.abs().max().item() + 1e-7
    kd_p, ce_p, grad_p = torch_rows(s, t, y, m, temperature, eps, kd_scale, 0.3)
    assert_accuracy_rule(kd, kd_p, kd_t, dtype, "kd_row")
    assert_accuracy_rule(ce, ce_p, ce_t, dtype, "ce_row")
    assert_accuracy_rule(grad, grad_p, grad_t, dtype, "grad")


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 5.0])
def test_distill_loss_is_distilbert_loss(impl, temperature):
    """KLDivLoss(batchmean)(log_softmax(s/T), softmax(t/T))·T² over KD rows + CE(-100), as DistilBERT's distiller."""
    s, t, y, m = make_rows(2 * 5, 300, torch.float32, impl)
    s, t, y, m = s.view(2, 5, 300), t.view(2, 5, 300), y.view(2, 5), m.view(2, 5)  # (B, L, V) as the model emits
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    out = distill_loss(s1, t, y, m, temperature, kd_weight=5.0, ce_weight=2.0)
    upstream = torch.rand((), device=impl) + 0.5  # non-unit upstream gradient
    (out.loss * upstream).backward()

    kd = F.kl_div(F.log_softmax(s2[m] / temperature, -1), F.softmax(t[m] / temperature, -1), reduction="batchmean")
    kd = kd * temperature**2
    ce = torch.nn.CrossEntropyLoss(ignore_index=-100)(s2.view(-1, 300), y.view(-1))
    ((5.0 * kd + 2.0 * ce) * upstream).backward()
    torch.testing.assert_close(out.kd, kd.detach(), **TOL[torch.float32])
    torch.testing.assert_close(out.ce, ce.detach(), **TOL[torch.float32])
    torch.testing.assert_close(out.loss, (5.0 * kd + 2.0 * ce).detach(), **TOL[torch.float32])
    assert_grad_close(s1.grad, s2.grad)
    assert not out.kd.requires_grad and not out.ce.requires_grad  # only `loss` carries the stored gradient


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_distill_loss_accuracy_rule(impl, dtype):
    s, t, y, m = make_rows(37, 1271, dtype, impl)
    s1 = s.clone().requires_grad_()
    out = distill_loss(s1, t, y, m, temperature=2.0, kd_weight=5.0, ce_weight=2.0)
    out.loss.backward()

    def loss_fn(x, t):
        kd = F.kl_div(F.log_softmax(x[m] / 2.0, -1), F.softmax(t[m] / 2.0, -1), reduction="batchmean") * 4.0
        return 5.0 * kd + 2.0 * F.cross_entropy(x, y)

    same = s.clone().requires_grad_()
    loss_same = loss_fn(same, t)
    loss_same.backward()
    truth = s.double().requires_grad_()
    loss_truth = loss_fn(truth, t.double())
    loss_truth.backward()
    assert_accuracy_rule(out.loss, loss_same.detach(), loss_truth.detach(), dtype, "loss")
    assert_accuracy_rule(s1.grad, same.grad, truth.grad, dtype, "grad")


def test_true_class_gradient_formed_in_fp32(impl):
    """Liger's bf16 bug: q − 1 at the true class with q ≈ 0.9997 rounds to 0 if q is rounded to bf16 first."""
    s = torch.zeros(4, 8)
    s[:, 3] = torch.tensor([8.0, 9.0, 10.0, 11.0])
    s = s.bfloat16().to(impl)
    y = torch.full((4,), 3, device=impl)
    _, _, grad = kd_ce_rows(s, None, y, ce_scale=1.0)
    truth = torch.softmax(s.double(), -1)[:, 3] - 1  # −3e-4 … −1e-4
    rel = ((grad[:, 3].double() - truth) / truth).abs().max().item()
    assert rel < 1e-2, f"true-class gradient off by {rel:.1%}"


def test_logits_are_not_rounded_before_the_fp32_cast(impl):
    """fp32 logits (and an fp32 teacher beside a bf16 student) keep fp32 accuracy: nothing rounds them to bf16."""
    s, t, y, m = make_rows(9, 777, torch.float32, impl)
    for student in (s, s.bfloat16()):
        kd, ce, grad = kd_ce_rows(student, t, y, m, 2.0, 1.0, 1.0)
        kd_t, ce_t, grad_t = kd_ce_rows_reference(student.double(), t.double(), y, m, 2.0, 1.0, 1.0)
        torch.testing.assert_close(kd.double(), kd_t, atol=2e-5, rtol=1e-6)
        torch.testing.assert_close(ce.double(), ce_t, atol=2e-5, rtol=1e-6)
        if student.dtype == torch.float32:
            assert_grad_close(grad, grad_t)


@pytest.mark.parametrize("v", [300, 5000], ids=["one-tile", "two-tiles"])
def test_neg_inf_logits(impl, v):
    """Masked vocabulary (−inf in both models, including a whole first block) and teacher-only −inf entries."""
    s, t, y, m = make_rows(3, v, torch.bfloat16, impl)
    banned = torch.zeros(v, dtype=torch.bool)
    banned[: 4096 if v > 4096 else v // 2] = True  # with v = 5000 the first 4096-wide block is −inf throughout
    banned[-3:] = True
    banned = banned.to(impl)
    y = torch.where(banned[y.clamp_min(0)], torch.full_like(y, v - 4), y)  # labels are never banned tokens
    s, t = s.masked_fill(banned, -math.inf), t.masked_fill(banned, -math.inf)
    t[0, v - 4] = -math.inf  # teacher-only −inf: p_t = 0 where the student is finite
    kd, ce, grad = kd_ce_rows(s, t, y, m, 2.0, 1.0, 1.0, label_smoothing=0.0)
    keep = ~banned
    kd_t, ce_t, grad_t = kd_ce_rows_reference(s[:, keep].double(), t[:, keep].double(), y - banned[:v - 4].sum(), m,
                                              2.0, 1.0, 1.0)  # fmt: skip
    assert torch.isfinite(kd).all() and torch.isfinite(ce).all() and not grad.isnan().any()
    torch.testing.assert_close(kd.double(), kd_t, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ce.double(), ce_t, atol=1e-4, rtol=1e-5)
    assert (grad[:, banned] == 0).all()
    torch.testing.assert_close(grad[:, keep].double(), grad_t, atol=1e-6, rtol=TOL[torch.bfloat16]["rtol"])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy reports the garbage rows' NaNs
def test_ignored_rows_are_zero_even_with_garbage(impl):
    """Rows with no KD and no label give 0 loss and 0 gradient, even when they hold −inf or NaN (padding)."""
    s, t, y, m = make_rows(5, 100, torch.float32, impl)
    m[1:3], y[1:3] = False, -100
    s[1], t[1] = -math.inf, -math.inf
    s[2], t[2] = math.nan, math.nan
    kd, ce, grad = kd_ce_rows(s, t, y, m, 2.0, 1.0, 1.0)
    assert (kd[1:3] == 0).all() and (ce[1:3] == 0).all() and (grad[1:3] == 0).all()
    assert torch.isfinite(kd).all() and torch.isfinite(ce).all() and torch.isfinite(grad).all()


def test_all_ignored_gives_zero_not_nan(impl):
    s, t, _, _ = make_rows(6, 50, torch.float32, impl)
    y = torch.full((6,), -100, device=impl)
    m = torch.zeros(6, dtype=torch.bool, device=impl)
    s1 = s.clone().requires_grad_()
    out = distill_loss(s1, t, y, m)
    out.loss.backward()
    assert out.loss.item() == out.kd.item() == out.ce.item() == 0.0
    assert (s1.grad == 0).all()
    s2 = s.clone().requires_grad_()
    loss = cross_entropy(s2, y)
    loss.backward()
    assert loss.item() == 0.0 and (s2.grad == 0).all()
    assert distill_loss(s[:0], t[:0], y[:0], m[:0]).loss.item() == 0.0  # no rows at all


def test_non_contiguous_inputs(impl):
    s, t, y, m = make_rows(7, 333, torch.bfloat16, impl)
    wide = torch.zeros(7, 400, dtype=s.dtype, device=impl)
    wide[:, :333] = s
    t_transposed = t.t().contiguous().t()  # column stride ≠ 1: copied by the launcher
    y2 = torch.stack([y, y], 1)[:, 0]  # strided labels
    m2 = torch.stack([m, m], 1)[:, 0]
    ours = kd_ce_rows(wide[:, :333], t_transposed, y2, m2, 2.0, 1.0, 1.0, label_smoothing=0.1)
    ref = kd_ce_rows(s, t, y, m, 2.0, 1.0, 1.0, label_smoothing=0.1)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("n,v", [(33, 100), (3, 5000)], ids=["one-tile", "two-tiles"])
def test_grad_written_in_place_over_the_student(impl, n, v):
    s, t, y, m = make_rows(n, v, torch.bfloat16, impl)
    kd, ce, grad = kd_ce_rows(s, t, y, m, 2.0, 0.5, 0.5, label_smoothing=0.1)
    buf = s.clone()
    kd2, ce2, grad2 = kd_ce_rows(buf, t, y, m, 2.0, 0.5, 0.5, label_smoothing=0.1, grad_out=buf)
    assert grad2.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(grad2, grad, atol=0, rtol=0)
    torch.testing.assert_close(kd2, kd, atol=0, rtol=0)
    torch.testing.assert_close(ce2, ce, atol=0, rtol=0)


def test_kd_only_and_ce_only_rows(impl):
    s, t, y, m = make_rows(11, 257, torch.float16, impl)
    for teacher, labels in [(t, None), (None, y)]:
        ours = kd_ce_rows(s, teacher, labels, m, 5.0, 1.0, 1.0)
        ref = kd_ce_rows_reference(s, teacher, labels, m, 5.0, 1.0, 1.0)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, **TOL[torch.float16])
    kd, ce, grad = kd_ce_rows(s, t, y, m, 2.0, compute_grad=False)
    assert grad is None and kd.shape == ce.shape == (11,)


def test_teacher_that_requires_grad_is_an_error(impl):
    s, t, y, m = make_rows(3, 10, torch.float32, impl)
    t = t.requires_grad_()
    with pytest.raises(ValueError, match="teacher"):
        distill_loss(s, t, y, m)
    with pytest.raises(ValueError, match="teacher"):
        kd_loss(s, t)
    with pytest.raises(ValueError, match="teacher"):
        kd_ce_rows(s, t, y, m, 2.0)


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.inf, math.nan])
def test_temperature_must_be_positive(impl, temperature):
    s, t, y, m = make_rows(3, 10, torch.float32, impl)
    with pytest.raises(ValueError, match="temperature"):
        distill_loss(s, t, y, m, temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, t, temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        kd_ce_rows(s, t, y, m, temperature)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_no_host_sync_in_forward_or_backward(impl, dtype):
    s, t, y, m = make_rows(9, 300, dtype, impl)
    s1 = s.clone().requires_grad_()
    with NoHostSync():
        out = distill_loss(s1, t, y, m, kd_weight=2.0)
        out.loss.backward()
        cross_entropy(s1, y).backward()
        kd_loss(s1, t, m).backward()
    assert s1.grad is not None


def test_second_backward_fails_loudly(impl):
    """The stored gradient is scaled in place; a second backward through a retained graph must not reuse it."""
    s, t, y, m = make_rows(4, 30, torch.float32, impl)
    s1 = s.clone().requires_grad_()
    loss = distill_loss(s1, t, y, m).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("upstream", [1.0, 0.25, math.nan])
def test_upstream_gradient_scales_the_stored_gradient(impl, upstream):
    """1 takes the no-pass shortcut of the scaling kernel; a NaN upstream must still reach the gradient."""
    s, t, y, m = make_rows(5, 5000, torch.bfloat16, impl)  # two tiles per row
    s1 = s.clone().requires_grad_()
    (distill_loss(s1, t, y, m).loss * upstream).backward()
    _, _, grad = kd_ce_rows_reference(s, t, y, m, 2.0, 1 / m.sum(), 1 / (y != -100).sum())
    torch.testing.assert_close(s1.grad, grad * upstream, **TOL[torch.bfloat16], equal_nan=True)
    assert s1.grad.isnan().all() if math.isnan(upstream) else not s1.grad.isnan().any()


def test_out_of_range_label_poisons_the_loss(triton_impl):
    s, t, y, m = make_rows(3, 10, torch.float32, triton_impl)
    y[1] = 10
    _, ce, _ = kd_ce_rows(s, t, y, m, 2.0, 1.0, 1.0)
    assert ce[1].isnan() and not ce[[0, 2]].isnan().any()


@pytest.mark.gpu
def test_row_offsets_beyond_int32():
    """N·V > 2³¹: row·stride must be 64-bit, or the last rows read and write the wrong memory."""
    n, v = 66_000, 32_768
    s = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    t = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, v, (n,), device="cuda")
    kd, ce, grad = kd_ce_rows(s, t, y, None, 2.0, 1.0, 1.0)
    tail = slice(n - 3, n)
    kd_t, ce_t, grad_t = kd_ce_rows_reference(s[tail], t[tail], y[tail], None, 2.0, 1.0, 1.0)
    torch.testing.assert_close(kd[tail], kd_t, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ce[tail], ce_t, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grad[tail], grad_t, **TOL[torch.bfloat16])


# Large offsets and extreme temperatures: the row maximum must not set the rounding of the result.
OFFSETS = [(1e3, 0.0), (1e4, 0.0), (0.0, 1e4), (1e5, 1e5), (1e3, -1e3), (-1e5, 0.0)]
TEMPERATURES = [1e-3, 0.1, 1.0, 2.0, 20.0]


def within_twice_torch(ours, theirs, truth, what, size=0.0):
    """|ours − truth| ≤ 2·|torch fp32 − truth| + 16 fp32 ulps of the largest entry, or of `size` when larger.

    Where both are accurate to a few ulps, which of the two lands closer is chance, hence the ulps; `size` is the
    size of the terms a result is the difference of (a small KL at T = 20 is two O(1) terms minus each other, in
    torch as in ours). The defects this guards against are hundreds of ulps of the logits' size, not the terms'."""
    e_ours, e_torch = max_err(ours, truth), max_err(theirs, truth)
    bound = 2 * e_torch + 2**-20 * max(truth.abs().max().item(), size)
    assert e_ours <= bound, f"{what}: error {e_ours:.3e} > 2 × torch's {e_torch:.3e}"


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("offsets", OFFSETS, ids=lambda o: f"s+{o[0]:g},t+{o[1]:g}")
@pytest.mark.parametrize("v", [500, 5000], ids=["one-tile", "two-tiles"])
def test_large_offsets_and_temperatures(impl, offsets, temperature, v):
    """Student N(0, 3²) + offset_s and teacher N(0, 3²) + offset_t in fp32: every output within 2× of torch's error.

    `lse = m + log d` followed by `z − lse` rounds at |m|, and KL = A/d_t + (m_s − m_t) + ... cancels two terms of
    the maxima's size: both lose ~|m|·2⁻²⁴ absolute, where torch loses only what rounding z = x/T itself costs.
    """
    n = 4
    s = torch.randn(n, v) * 3 + offsets[0]
    t = torch.randn(n, v) * 3 + offsets[1]
    y = torch.randint(0, v, (n,))
    s, t, y = s.to(impl), t.to(impl), y.to(impl)
    kd_scale, ce_scale = 0.7, 0.3
    ours = kd_ce_rows(s, t, y, None, temperature, kd_scale, ce_scale, label_smoothing=0.1)
    theirs = torch_rows(s, t, y, torch.ones(n, dtype=torch.bool, device=impl), temperature, 0.1, kd_scale, ce_scale)
    truth = torch_rows(s.double(), t.double(), y, torch.ones(n, dtype=torch.bool, device=impl), temperature, 0.1,
                       kd_scale, ce_scale)  # fmt: skip
    # KL = E_pt[δ] + log E_pt[e^−δ] with δ = ((t − max t) − (s − max s))/T: T² times the size of those two terms.
    s64, t64 = s.double(), t.double()
    delta = ((t64 - t64.amax(-1, keepdim=True)) - (s64 - s64.amax(-1, keepdim=True))) / temperature
    p_t = torch.softmax(t64 / temperature, -1)
    kl_terms = (p_t * delta.abs()).sum(-1) + (p_t * (-delta).exp()).sum(-1).log().abs()
    sizes = (temperature**2 * kl_terms.max().item(), 0.0, 0.0)
    for what, o, th, tr, size in zip(("kd_row", "ce_row", "grad"), ours, theirs, truth, sizes):
        within_twice_torch(o, th, tr, f"{what} at offsets {offsets}, T={temperature}", size)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_kl_with_far_apart_maxima(impl, temperature):
    """Student N(0,1) + 1e4 against teacher N(0,1): KL ≈ 1, from terms that each carry the 1e4 offset."""
    s = (torch.randn(8, 1000) + 1e4).to(impl)
    t = torch.randn(8, 1000).to(impl)
    ours = kd_loss(s, t, temperature=temperature)
    truth = F.kl_div(F.log_softmax(s.double() / temperature, -1), F.softmax(t.double() / temperature, -1),
                     reduction="batchmean") * temperature**2  # fmt: skip
    theirs = F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1), reduction="batchmean")
    within_twice_torch(ours, theirs * temperature**2, truth, "kd")


# NaN in a selected row: NaN loss and a NaN gradient row, as torch gives; rows not selected stay untouched.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy reports the NaN rows
@pytest.mark.parametrize(
    "where", ["student_entry", "teacher_entry", "teacher_row_neg_inf", "student_row_nan", "student_row_neg_inf"]
)
@pytest.mark.parametrize("v", [300, 5000], ids=["one-tile", "two-tiles"])
def test_nan_in_a_selected_row_gives_nan(impl, where, v):
    s, t, y, m = make_rows(4, v, torch.float32, impl)
    m[:] = True
    y[1] = -100  # row 1 is a KD row only: the NaN must come through the KD term
    if where == "student_entry":
        s[1, v // 3] = math.nan
    elif where == "teacher_entry":
        t[1, v - 2] = math.nan
    elif where == "teacher_row_neg_inf":
        t[1] = -math.inf
    elif where == "student_row_nan":
        s[1] = math.nan
    else:
        s[1] = -math.inf
    x = s.clone().requires_grad_()
    out = distill_loss(x, t, y, m)
    out.loss.backward()
    assert out.loss.isnan() and out.kd.isnan(), f"{where}: loss {out.loss.item()}, kd {out.kd.item()}"
    assert x.grad[1].isnan().all(), f"{where}: gradient row has {x.grad[1].isnan().sum().item()} NaN of {v}"
    assert torch.isfinite(x.grad[[0, 2, 3]]).all()
    # Torch agrees that this is NaN (and not, say, +inf).
    kd_torch = F.kl_div(F.log_softmax(s[1] / 2, -1), F.softmax(t[1] / 2, -1), reduction="sum")
    assert kd_torch.isnan()
    # The same row with only a CE label and no KD selection: the teacher is not read for it.
    if where.startswith("teacher"):
        m[1], y[1] = False, 3
        out = distill_loss(s, t, y, m)
        assert torch.isfinite(out.loss), where


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_logit_in_cross_entropy(impl):
    s, _, y, _ = make_rows(4, 300, torch.float32, impl)
    y[:] = 5
    s[2, 100] = math.nan
    x = s.clone().requires_grad_()
    loss = cross_entropy(x, y)
    loss.backward()
    assert loss.isnan() and x.grad[2].isnan().all() and torch.isfinite(x.grad[[0, 1, 3]]).all()
