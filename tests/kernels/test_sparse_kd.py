"""Sparse-target KD + CE (kernels/sparse_kd.py) against an fp64 autograd oracle of the top-K + tail formula.

Every parity test runs on the Triton kernel (Triton's interpreter on CPU) and on the pure-PyTorch reference (the
`impl` fixture below extends the shared one with this module's reference and launcher). K ∈ {1, 8, 64, V}; K = V
must be the dense `distill_loss`; ties at the K-th logit, −inf logits, ignored rows, bad ids, in-place gradients.
"""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from kernels import distill_loss, kd_ce_rows
from kernels._dispatch import use_triton
from kernels.reference_sparse import sparse_kd_ce_rows_reference
from kernels.sparse_kd import SparseDistillLoss, sparse_distill_loss, sparse_kd_ce_rows, sparse_targets
from tests.kernels.common import NoHostSync, make_rows
from tests.kernels.tolerances import DTYPES, TOL, assert_accuracy_rule, assert_grad_close, max_err

_sparse = importlib.import_module("kernels.sparse_kd")


def _tripwire(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} ran on a path meant to avoid it")

    return fail


@pytest.fixture
def impl(impl, monkeypatch):
    """The shared fixture (Triton / reference), with this module's launcher or reference made a tripwire too."""
    triton_path = use_triton(torch.empty(0, device=impl))
    name = "sparse_kd_ce_rows_reference" if triton_path else "sparse_kd_ce_fwd"
    monkeypatch.setattr(_sparse, name, _tripwire(name))
    return impl


def oracle(s, tv, ti, lse, y, m, temperature, eps, kd_scale, ce_scale):
    """fp64 truth straight from the formula, gradient by autograd (independent of the hand-derived one):
    kd_row = T²[Σ_k q_k(log q_k − log p_k) + q_tail(log q_tail − log s_tail)], s_tail summed over the tail."""
    z = s.detach().double().requires_grad_()
    n, v = z.shape
    k = tv.shape[1]
    log_p = torch.log_softmax(z / temperature, -1)
    idx = ti.long()
    log_q = tv.double() / temperature - lse.double()[:, None]
    q = log_q.exp()
    kl = (q * (log_q - log_p.gather(1, idx))).sum(1)
    if k < v:
        kept = torch.zeros(n, v, dtype=torch.bool, device=z.device).scatter_(1, idx, True)
        q_tail = (1 - q.sum(1)).clamp_min(0)
        log_s_tail = torch.logsumexp(log_p.masked_fill(kept, -math.inf), -1)
        kl = kl + torch.where(q_tail == 0, 0.0, q_tail * (q_tail.log() - log_s_tail))  # 0·log 0 = 0
    kd = torch.where(m, kl * temperature**2, torch.zeros_like(kl))
    ce = F.cross_entropy(z, y, ignore_index=-100, label_smoothing=eps, reduction="none")
    (kd_scale * kd.sum() + ce_scale * ce.sum()).backward()
    return kd.detach(), ce.detach(), z.grad


def rows(n, v, k, dtype, device, temperature, scale=3.0):
    """Student logits in `dtype`, sparse targets from a random fp32 teacher, labels (~30% ignored), a KD mask."""
    s, t, y, m = make_rows(n, v, torch.float32, device, scale)
    tv, ti, lse = sparse_targets(t, k, temperature)
    return s.to(dtype), t, tv, ti, lse, y, m


# (N, V, K, T, ε): K ∈ {1, 8, 64, V}; V = 1; several rows per program (V small, N not a multiple); V above one tile.
SHAPES = [
    (1, 1, 1, 1.0, 0.0),
    (3, 7, 1, 2.0, 0.1),
    (67, 7, 3, 0.5, 0.0),
    (5, 9, 9, 2.0, 0.1),
    (41, 300, 8, 5.0, 0.1),
    (5, 1271, 64, 0.5, 0.0),
    (2, 5000, 64, 2.0, 0.0),
    (2, 5000, 1, 1.0, 0.1),
    (2, 5000, 5000, 2.0, 0.1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,v,k,temperature,eps", SHAPES, ids=[f"{n}x{v}k{k}" for n, v, k, *_ in SHAPES])
def test_sparse_kd_ce_rows_accuracy(impl, n, v, k, temperature, eps, dtype):
    s, _, tv, ti, lse, y, m = rows(n, v, k, dtype, impl, temperature)
    kd_scale, ce_scale = 0.7, torch.tensor(0.3, device=impl)
    kd, ce, grad = sparse_kd_ce_rows(s, tv, ti, lse, y, m, temperature, kd_scale, ce_scale, label_smoothing=eps)
    kd_t, ce_t, grad_t = oracle(s, tv, ti, lse, y, m, temperature, eps, kd_scale, 0.3)
    assert kd.dtype == ce.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(kd.double(), kd_t, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ce.double(), ce_t, atol=1e-4, rtol=1e-5)
    assert max_err(grad, grad_t) <= TOL[dtype]["rtol"] * grad_t.abs().max().item() + 1e-7
    # The rule of Cut Cross-Entropy against the same formula evaluated by torch in the input dtype.
    kd_p, ce_p, grad_p = oracle_in_dtype(s, tv, ti, lse, y, m, temperature, eps, kd_scale, 0.3)
    assert_accuracy_rule(kd, kd_p, kd_t, dtype, "kd_row")
    assert_accuracy_rule(grad, grad_p, grad_t, dtype, "grad")


def oracle_in_dtype(s, tv, ti, lse, y, m, temperature, eps, kd_scale, ce_scale):
    """The oracle's formula run by torch in the student's dtype (what a user would write): the accuracy rule's
    `theirs`."""
    z = s.detach().clone().requires_grad_()
    n, v = z.shape
    log_p = torch.log_softmax(z / temperature, -1)
    idx = ti.long()
    log_q = (tv / temperature - lse[:, None]).to(z.dtype)
    q = log_q.exp()
    kl = (q * (log_q - log_p.gather(1, idx))).sum(1)
    if tv.shape[1] < v:
        kept = torch.zeros(n, v, dtype=torch.bool, device=z.device).scatter_(1, idx, True)
        q_tail = (1 - q.sum(1)).clamp_min(0)
        log_s_tail = torch.logsumexp(log_p.masked_fill(kept, -math.inf), -1)
        kl = kl + torch.where(q_tail == 0, 0.0, q_tail * (q_tail.log() - log_s_tail))
    kd = torch.where(m, kl * temperature**2, torch.zeros_like(kl))
    ce = F.cross_entropy(z, y, ignore_index=-100, label_smoothing=eps, reduction="none")
    (kd_scale * kd.sum() + ce_scale * ce.sum()).backward()
    return kd.detach(), ce.detach(), z.grad


@pytest.mark.parametrize("k", [1, 8, 64])
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_hand_gradient_is_autograd_of_the_formula(k, temperature):
    """The derived gradient (kept ids: T(p − q); tail: T p (1 − q_tail/s_tail)) against fp64 autograd, on the
    reference in fp64 (no kernel rounding in the way): agreement to fp64 precision, not to a tolerance."""
    s, _, tv, ti, lse, y, m = rows(6, 200, k, torch.float64, "cpu", temperature)
    kd, ce, grad = sparse_kd_ce_rows_reference(s, tv.double(), ti, lse.double(), y, m, temperature, 0.9, 0.4, 0.1)
    kd_t, ce_t, grad_t = oracle(s, tv, ti, lse, y, m, temperature, 0.1, 0.9, 0.4)
    torch.testing.assert_close(kd, kd_t, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(ce, ce_t, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grad, grad_t, atol=1e-14, rtol=1e-10)
    # The KD gradient sums to 0 over every row (the tail's T(s_tail − q_tail) against the kept ids' T(q_tail − s_tail)).
    _, _, g_kd = sparse_kd_ce_rows_reference(s, tv.double(), ti, lse.double(), None, m, temperature, 1.0)
    assert g_kd.sum(1).abs().max() < 1e-14


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("v", [9, 1271], ids=["classes", "vocab"])
def test_k_equal_v_is_the_dense_distill_loss(impl, temperature, v):
    """K = V (every entry kept: what a cache stores for classes, QA positions or a small vocabulary) is exactly the
    dense KD+CE: loss terms and gradient equal to `distill_loss` on the full teacher logits."""
    s, t, y, m = make_rows(2 * 5, v, torch.float32, impl)
    s, t, y, m = s.view(2, 5, v), t.view(2, 5, v), y.view(2, 5), m.view(2, 5)
    tv, ti, lse = sparse_targets(t, v, temperature)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    ours = sparse_distill_loss(s1, tv, ti, lse, y, m, temperature, kd_weight=5.0, ce_weight=2.0)
    dense = distill_loss(s2, t, y, m, temperature, kd_weight=5.0, ce_weight=2.0)
    upstream = torch.rand((), device=impl) + 0.5
    (ours.loss * upstream).backward()
    (dense.loss * upstream).backward()
    for a, b in zip(ours, dense):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-6)
    assert_grad_close(s1.grad, s2.grad)
    # A permutation of the kept entries changes nothing.
    perm = torch.randperm(v, device=impl)
    s3 = s.clone().requires_grad_()
    again = sparse_distill_loss(s3, tv[..., perm], ti[..., perm], lse, y, m, temperature, 5.0, 2.0)
    (again.loss * upstream).backward()
    torch.testing.assert_close(again.loss, ours.loss, atol=2e-6, rtol=1e-6)
    assert_grad_close(s3.grad, s1.grad)


def test_k_below_v_against_the_dense_kl(impl):
    """K < V: the bucketed KL is at most the dense one (log-sum inequality) and equals it when the student's tail is
    the teacher's tail up to a factor (the student's tail logits = the teacher's plus a constant)."""
    s, t, y, m = make_rows(6, 400, torch.float32, impl)
    tv, ti, lse = sparse_targets(t, 16, 2.0)
    kd_sparse, _, _ = sparse_kd_ce_rows(s, tv, ti, lse, None, None, 2.0)
    kd_dense, _, _ = kd_ce_rows(s, t, None, None, 2.0)
    assert (kd_sparse <= kd_dense + 1e-5).all()
    kept = torch.zeros_like(t, dtype=torch.bool).scatter_(1, ti.long(), True)
    s_matched = torch.where(kept, s, t + 1.5)
    kd_sparse, _, _ = sparse_kd_ce_rows(s_matched, tv, ti, lse, None, None, 2.0)
    kd_dense, _, _ = kd_ce_rows(s_matched, t, None, None, 2.0)
    torch.testing.assert_close(kd_sparse, kd_dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gap", [10.0, 30.0, 50.0])
@pytest.mark.parametrize("v", [300, 5000], ids=["one-tile", "two-tiles"])
def test_tiny_student_tail(impl, gap, v):
    """A student with nearly all its mass on the kept ids (s_tail ≈ e^(−gap/T)·V/K: 0.2 down to 5e-10) against a teacher
    whose tail holds real mass: the tail term q_tail·log(q_tail/s_tail) dominates and must keep fp32 accuracy; s_tail
    as 1 − Σ_k p_k in fp32 would be noise below ~1e-6. One row has a tail entry above every kept one (a rescale)."""
    k, temperature = 8, 2.0
    s, t, y, m = make_rows(4, v, torch.float32, impl, scale=1.0)
    tv, ti, lse = sparse_targets(t, k, temperature)
    kept = torch.zeros_like(s, dtype=torch.bool).scatter_(1, ti.long(), True)
    s = torch.where(kept, s + gap, s)
    s[3, (~kept[3]).nonzero()[0, 0]] = s[3].max() + 1.0  # row 3: the maximum in the tail
    m[:] = True
    kd, ce, grad = sparse_kd_ce_rows(s, tv, ti, lse, y, m, temperature, 1.0, 1.0)
    kd_t, ce_t, grad_t = oracle(s, tv, ti, lse, y, m, temperature, 0.0, 1.0, 1.0)
    torch.testing.assert_close(kd.double(), kd_t, atol=1e-5, rtol=1e-5)
    assert_grad_close(grad, grad_t)


@pytest.mark.parametrize("k", [1, 8])
def test_ties_at_the_kth_logit(impl, k):
    """Teacher rows whose K-th and (K+1)-th logits tie: whichever id the cache kept, the loss and gradient are the
    formula's for the ids kept; keeping the other tied id gives that formula's values (equal here: the tied ids'
    student logits are equal too), and the order of the kept entries does not matter."""
    n, v = 4, 50
    s, t, y, m = make_rows(n, v, torch.float32, impl)
    top = t.topk(k + 1, dim=-1).indices
    a, b = top[:, k - 1], top[:, k]  # the K-th and (K+1)-th largest teacher logits: made equal
    t.scatter_(1, b[:, None], t.gather(1, a[:, None]))
    s.scatter_(1, b[:, None], s.gather(1, a[:, None]))
    tv, ti, lse = sparse_targets(t, k, 2.0)
    got = sparse_kd_ce_rows(s, tv, ti, lse, y, m, 2.0, 1.0, 1.0)
    truth = oracle(s, tv, ti, lse, y, m, 2.0, 0.0, 1.0, 1.0)
    for g, tr in zip(got, truth):
        torch.testing.assert_close(g.double(), tr, atol=2e-6, rtol=1e-5)
    # The other choice of the tied id: swap the (K-th) tied id for its twin.
    chosen = ti[:, -1:].long()
    twin = torch.where(chosen == a[:, None], b[:, None], a[:, None])
    other = ti.clone()
    other[:, -1:] = twin.to(other.dtype)
    got2 = sparse_kd_ce_rows(s, tv, other, lse, y, m, 2.0, 1.0, 1.0)
    truth2 = oracle(s, tv, other, lse, y, m, 2.0, 0.0, 1.0, 1.0)
    for g, tr in zip(got2, truth2):
        torch.testing.assert_close(g.double(), tr, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got2[0], got[0], atol=2e-6, rtol=1e-5)
    perm = torch.randperm(k, device=impl)
    got3 = sparse_kd_ce_rows(s, tv[:, perm], ti[:, perm], lse, y, m, 2.0, 1.0, 1.0)
    for g, g3 in zip(got, got3):
        torch.testing.assert_close(g3, g, atol=1e-6, rtol=1e-6)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy reports −inf − (−inf) in masked lanes
@pytest.mark.parametrize("v,k", [(300, 8), (300, 300), (5000, 64)], ids=["tail", "full", "two-tiles"])
def test_neg_inf_logits(impl, v, k):
    """Masked vocabulary (−inf in both models, a whole first block for V = 5000) and a teacher support smaller than
    K (kept entries of −inf: q = 0, nothing added); finite loss and gradient, 0 gradient at banned entries, equal to the
    fp64 reference on the vocabulary without the banned entries."""
    s, t, y, m = make_rows(3, v, torch.float32, impl)
    banned = torch.zeros(v, dtype=torch.bool)
    banned[: 4096 if v > 4096 else v // 2] = True
    banned[-3:] = True
    banned = banned.to(impl)
    y = torch.where(banned[y.clamp_min(0)], torch.full_like(y, v - 4), y)
    s, t = s.masked_fill(banned, -math.inf), t.masked_fill(banned, -math.inf)
    t[0, : v - 5] = -math.inf  # row 0: a teacher support of 2 entries, fewer than K (k > 2)
    tv, ti, lse = sparse_targets(t, k, 2.0)
    kd, ce, grad = sparse_kd_ce_rows(s, tv, ti, lse, y, m, 2.0, 1.0, 1.0)
    assert torch.isfinite(kd).all() and torch.isfinite(ce).all() and torch.isfinite(grad).all()
    assert (grad[:, banned] == 0).all()
    kd_t, ce_t, grad_t = sparse_kd_ce_rows_reference(s.double(), tv.double(), ti, lse.double(), y, m, 2.0, 1.0, 1.0)
    torch.testing.assert_close(kd.double(), kd_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ce.double(), ce_t, atol=1e-5, rtol=1e-5)
    assert_grad_close(grad, grad_t)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_student_ruling_out_teacher_mass_gives_inf(impl):
    """A student −inf at a kept id where the teacher has mass: KL = +inf (as the dense KL), gradient finite; a student
    that rules out its whole tail while the teacher's tail has mass: +inf, and 0 gradient on that tail."""
    s, t, _, _ = make_rows(2, 40, torch.float32, impl)
    tv, ti, lse = sparse_targets(t, 4, 2.0)
    s[0, ti[0, 0].long()] = -math.inf
    kept1 = torch.zeros(40, dtype=torch.bool, device=impl).scatter_(0, ti[1].long(), True)
    s[1] = s[1].masked_fill(~kept1, -math.inf)
    kd, _, grad = sparse_kd_ce_rows(s, tv, ti, lse, None, None, 2.0, 1.0)
    assert kd.isinf().all() and (kd > 0).all()
    assert torch.isfinite(grad).all() and (grad[1, ~kept1] == 0).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_ignored_rows_are_zero_even_with_garbage(impl):
    """Rows with no KD and no label give 0 loss and 0 gradient even when they hold NaN, −inf or bad ids (padding)."""
    s, _, tv, ti, lse, y, m = rows(5, 100, 8, torch.float32, impl, 2.0)
    m[1:4], y[1:4] = False, -100
    s[1], tv[1], lse[1] = -math.inf, -math.inf, -math.inf
    s[2], tv[2], lse[2] = math.nan, math.nan, math.nan
    ti[3] = 10_000
    kd, ce, grad = sparse_kd_ce_rows(s, tv, ti, lse, y, m, 2.0, 1.0, 1.0)
    assert (kd[1:4] == 0).all() and (ce[1:4] == 0).all() and (grad[1:4] == 0).all()
    assert torch.isfinite(kd).all() and torch.isfinite(ce).all() and torch.isfinite(grad).all()
    s1 = s.clone().requires_grad_()
    m[:], y[:] = False, -100
    out = sparse_distill_loss(s1, tv, ti, lse, y, m)
    out.loss.backward()
    assert out.loss.item() == out.kd.item() == out.ce.item() == 0.0 and (s1.grad == 0).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("where", ["id_high", "id_negative", "nan_student", "nan_teacher", "teacher_neg_inf"])
def test_bad_selected_row_gives_nan(impl, where):
    """A kept id outside [0, V) (checked on the device, never read), a NaN, or a teacher without a distribution
    (L = −inf): NaN KD row and NaN gradient row; the other rows untouched."""
    s, _, tv, ti, lse, y, m = rows(4, 64, 8, torch.float32, impl, 2.0)
    m[:] = True
    y[1] = -100
    if where == "id_high":
        ti[1, 3] = 64
    elif where == "id_negative":
        ti[1, 0] = -1
    elif where == "nan_student":
        s[1, 5] = math.nan
    elif where == "nan_teacher":
        tv[1, 2] = math.nan
    else:
        tv[1], lse[1] = -math.inf, -math.inf
    x = s.clone().requires_grad_()
    out = sparse_distill_loss(x, tv, ti, lse, y, m)
    out.loss.backward()
    assert out.kd.isnan() and x.grad[1].isnan().all()
    assert torch.isfinite(x.grad[[0, 2, 3]]).all()


@pytest.mark.parametrize("n,v,k", [(33, 100, 8), (3, 5000, 64), (3, 300, 300)], ids=["one-tile", "two-tiles", "K=V"])
def test_grad_written_in_place_over_the_student(impl, n, v, k):
    s, _, tv, ti, lse, y, m = rows(n, v, k, torch.bfloat16, impl, 2.0)
    ref = sparse_kd_ce_rows(s, tv, ti, lse, y, m, 2.0, 0.5, 0.5, label_smoothing=0.1)
    buf = s.clone()
    got = sparse_kd_ce_rows(buf, tv, ti, lse, y, m, 2.0, 0.5, 0.5, label_smoothing=0.1, grad_out=buf)
    assert got[2].data_ptr() == buf.data_ptr()
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_int64_ids_bf16_teacher_and_strided_inputs(impl):
    """int64 ids, bf16 top-K logits and strided student rows: the reference's values for the same inputs."""
    s, t, y, m = make_rows(7, 333, torch.float32, impl)
    tv, ti, lse = sparse_targets(t, 16, 2.0)
    tv = tv.bfloat16()
    wide = torch.zeros(7, 400, device=impl)
    wide[:, :333] = s
    got = sparse_kd_ce_rows(wide[:, :333], tv, ti.long(), lse, y, m, 2.0, 1.0, 1.0)
    ref = sparse_kd_ce_rows_reference(s.double(), tv.double(), ti, lse.double(), y, m, 2.0, 1.0, 1.0)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b, atol=2e-6, rtol=1e-5)


def test_upstream_gradient_and_fp16(impl):
    """A non-unit upstream gradient scales the stored gradient; fp16 stores it pre-scaled (kernels._grad) and the
    backward gives the reference's gradient."""
    for dtype in (torch.float32, torch.float16):
        s, _, tv, ti, lse, y, m = rows(6, 300, 8, dtype, impl, 2.0)
        x = s.clone().requires_grad_()
        (sparse_distill_loss(x, tv, ti, lse, y, m, 2.0, 5.0, 2.0).loss * 0.25).backward()
        n_kd, n_ce = m.sum().clamp_min(1), (y != -100).sum().clamp_min(1)
        _, _, g = sparse_kd_ce_rows_reference(s.double(), tv.double(), ti, lse.double(), y, m, 2.0, 5.0 / n_kd,
                                              2.0 / n_ce)  # fmt: skip
        assert max_err(x.grad, g * 0.25) <= TOL[dtype]["rtol"] * (g * 0.25).abs().max().item() + 1e-7


def test_no_host_sync_in_forward_or_backward(impl):
    s, _, tv, ti, lse, y, m = rows(9, 300, 8, torch.bfloat16, impl, 2.0)
    x = s.clone().requires_grad_()
    with NoHostSync():
        out = sparse_distill_loss(x, tv, ti, lse, y, m, kd_weight=2.0)
        out.loss.backward()
    assert x.grad is not None


def test_module_matches_function(impl):
    s, _, tv, ti, lse, y, m = rows(4, 50, 8, torch.float32, impl, 4.0)
    a = SparseDistillLoss(4.0, 2.0, 0.5)(s, tv, ti, lse, y, m)
    b = sparse_distill_loss(s, tv, ti, lse, y, m, 4.0, 2.0, 0.5)
    for x, z in zip(a, b):
        torch.testing.assert_close(x, z, atol=0, rtol=0)


def test_contract_errors(impl):
    s, t, tv, ti, lse, y, m = rows(3, 10, 4, torch.float32, impl, 2.0)
    with pytest.raises(ValueError, match="topk_logits"):
        sparse_distill_loss(s, torch.zeros(3, 11, device=impl), ti, lse)  # K > V
    with pytest.raises(ValueError, match="topk_indices"):
        sparse_distill_loss(s, tv, ti[:, :2], lse)
    with pytest.raises(ValueError, match="topk_indices"):
        sparse_distill_loss(s, tv, ti.float(), lse)
    with pytest.raises(ValueError, match="teacher_lse"):
        sparse_distill_loss(s, tv, ti, lse[:2])
    with pytest.raises(ValueError, match="topk_logits"):
        sparse_distill_loss(s, tv.clone().requires_grad_(), ti, lse)
    with pytest.raises(ValueError, match="temperature"):
        sparse_distill_loss(s, tv, ti, lse, temperature=0.0)
    with pytest.raises(ValueError, match="k"):
        sparse_targets(t, 0, 2.0)
