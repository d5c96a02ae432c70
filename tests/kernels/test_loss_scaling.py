"""fp16 under loss scaling: a gradient formed in the forward must survive the scale that arrives in the backward.

The losses write ∂loss/∂x during the forward, before the upstream gradient (the loss scale S of fp16 training) is
known. Rounded to fp16 at S = 1, gradient entries below fp16's range flush to 0 or keep a few bits, though torch's
(fp16 leaves, fp32 loss, `(loss * S).backward()`) are fine: the scale exists to lift them into range. The rule: on
every entry that torch's gradient holds as a normal fp16 number, ours is within 1% of torch's, and none of those is
flushed. Both paths, every op; S = 2¹⁶ (the scaler's start), 2¹⁰, a scale that is not a power
of two, and the largest power of two torch does not overflow at (where a dynamic scaler settles).

Where a gradient entry is a small difference of larger terms, fp32 arithmetic (torch's as much as ours) is off from
the exact value by a few ulps of those terms, far more than 1% of the entry; such entries are allowed that
difference (`noise`, 16 fp32 ulps of the terms), computed in fp64 from the terms each op's gradient is made of.
"""

import pytest
import torch
import torch.nn.functional as F

from kernels import (
    cosine_loss,
    cross_entropy,
    distill_loss,
    fused_linear_cross_entropy,
    fused_linear_distill_loss,
    kd_loss,
    log_softmax,
    softmax,
)
from tests.kernels.common import NoHostSync

FP16_TINY = 2.0**-14  # smallest normal fp16
FP16_MAX = 65504.0
FP32_NOISE = 2.0**-20  # 16 fp32 ulps


def assert_scaled_gradient_matches(ours, theirs, noise, what: str, rel: float = 0.01):
    """On torch's normal-range entries: |ours − torch| ≤ rel·|torch| + noise, and none of them is 0 in ours."""
    assert ours.dtype == theirs.dtype == torch.float16, what
    assert not ours.isnan().any() and not ours.isinf().any(), f"{what}: inf or NaN in ours"
    o, t = ours.double(), theirs.double()
    normal = t.abs() >= FP16_TINY
    assert normal.sum() > 0, f"{what}: no normal-range entry to compare"
    off = ((o - t).abs() > rel * t.abs() + noise) & normal
    flushed = (o == 0) & normal
    worst = ((o - t).abs() / t.abs())[off].max().item() if off.any() else 0.0
    assert off.sum() == 0 and flushed.sum() == 0, (
        f"{what}: {off.sum().item()} of {normal.sum().item()} normal-range entries off by > {rel:.0%} "
        f"(worst {worst:.2%}), {flushed.sum().item()} flushed to 0"
    )


def grad_of(loss_fn, leaf, scale=1.0, dtype=None):
    """∂(scale · Σ loss_fn(leaf))/∂leaf, the leaf cast to `dtype` first when given."""
    x = leaf.detach().to(dtype or leaf.dtype).requires_grad_()
    loss = loss_fn(x)
    (loss * (scale.to(loss.dtype) if isinstance(scale, torch.Tensor) else scale)).sum().backward()
    return x.grad


def wide(x, like=None):
    """x in fp32 (torch's fp32 loss on fp16 leaves), or fp64 when `like` (default x) is fp64 (the truth)."""
    like = x if like is None else like
    return x.to(torch.float64 if like.dtype == torch.float64 else torch.float32)


def scales_for(loss_fn, leaf):
    """S = 2¹⁶, 2¹⁰, 3·2¹³ and the largest power of two at which torch's fp16 gradient does not overflow, keeping
    only those at which it does not (an overflowed step is skipped and the scaler backs off: nothing to compare)."""
    top = grad_of(loss_fn, leaf, dtype=torch.float64).abs().max().item()
    edge = 2.0 ** int(torch.tensor(FP16_MAX / top).log2().floor())
    return sorted({s for s in (2.0**16, 2.0**10, 3.0 * 2**13, edge) if s * top <= FP16_MAX / 2 or s == edge})


def check_op(ours, theirs, leaf, noise_fn, what, scales=None):
    for scale in scales or scales_for(theirs, leaf):
        g_ours, g_torch = grad_of(ours, leaf, scale), grad_of(theirs, leaf, scale)
        noise = FP32_NOISE * noise_fn(scale)
        label = "per row" if isinstance(scale, torch.Tensor) else f"{scale:g}"
        assert_scaled_gradient_matches(g_ours, g_torch, noise, f"{what}, S={label}")


def logit_terms(s, t, y, m, temperature, kd_weight, ce_weight, smoothing=0.0):
    """Per entry, the size of the terms the logit gradient sums, kd_coef·(p_s + p_t) + ce_coef·(q + ε/V + 1_y), each
    probability p weighted by 1 + |log p|: p = exp(z) is formed from z = x − log d, which fp32 holds to ~2⁻²⁴|z|."""
    s = s.double()
    n, v = s.shape

    def spread(log_p):
        return log_p.exp() * (1 + log_p.abs())

    terms = torch.zeros_like(s)
    if t is not None:
        rows = torch.ones(n, dtype=torch.bool, device=s.device) if m is None else m
        log_ps, log_pt = torch.log_softmax(s / temperature, -1), torch.log_softmax(t.double() / temperature, -1)
        coef = kd_weight * temperature / rows.sum().clamp_min(1)
        terms += torch.where(rows[:, None], coef * (spread(log_ps) + spread(log_pt)), 0)
    if y is not None:
        valid = y != -100
        onehot = F.one_hot(y.clamp_min(0), v).double()
        q = spread(torch.log_softmax(s, -1)) + smoothing / v + onehot
        terms += torch.where(valid[:, None], ce_weight / valid.sum().clamp_min(1) * q, 0)
    return terms


def distill_torch(s, t, y, m):
    """One fp32 (or fp64) copy of the logits feeds both terms, so the fp16 leaf's gradient is rounded once."""
    return 5.0 * kl(s[m], t[m], 2.0) + 2.0 * F.cross_entropy(s, y)


def rows(n, v, device):
    s = (torch.randn(n, v) * 3).half().to(device)
    t = (torch.randn(n, v) * 3).half().to(device)
    y = torch.randint(0, v, (n,))
    y[torch.rand(n) < 0.2] = -100
    return s, t, y.to(device), (torch.rand(n) < 0.8).to(device)


def kl(s, t, temperature):
    log_p, p_t = F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1)
    return F.kl_div(log_p, p_t, reduction="batchmean") * temperature**2


@pytest.mark.parametrize("n,v", [(64, 700), (3, 5000)], ids=["one-tile", "two-tiles"])
def test_logit_losses(impl, n, v):
    s, t, y, m = rows(n, v, impl)
    cases = {
        "cross_entropy": (
            lambda x: cross_entropy(x, y),
            lambda x: F.cross_entropy(wide(x), y),
            logit_terms(s, None, y, None, 1.0, 0.0, 1.0),
        ),
        "cross_entropy(smoothing)": (
            lambda x: cross_entropy(x, y, label_smoothing=0.1),
            lambda x: F.cross_entropy(wide(x), y, label_smoothing=0.1),
            logit_terms(s, None, y, None, 1.0, 0.0, 1.0, 0.1),
        ),
        "distill_loss": (
            lambda x: distill_loss(x, t, y, m, temperature=2.0, kd_weight=5.0, ce_weight=2.0).loss,
            lambda x: distill_torch(wide(x), wide(t, x), y, m),
            logit_terms(s, t, y, m, 2.0, 5.0, 2.0),
        ),
        "kd_loss(T=0.5)": (
            lambda x: kd_loss(x, t, temperature=0.5),
            lambda x: kl(wide(x), wide(t, x), 0.5),
            logit_terms(s, t, None, None, 0.5, 1.0, 0.0),
        ),
    }
    bound = {"distill_loss": 5.0 * 2.0 + 2.0}  # B = |kd_weight|·T + |ce_weight| (kernels/_grad.py); 1 elsewhere
    for what, (ours, theirs, terms) in cases.items():
        # The stored K·g is fp16 with K ≥ 2¹⁴/B, so an entry below K's normal range keeps an absolute error of half
        # a subnormal step, 2⁻²⁵, which the backward's S/K turns into at most S·B·2⁻³⁹ (the stated bound's
        # "S·B ≤ 2¹⁸" regime ends there; distill_loss at S = 2¹⁶ has S·B ≈ 2^19.6).
        quantum = bound.get(what, 1.0) * 2.0**-39 / FP32_NOISE
        check_op(ours, theirs, s, lambda scale, terms=terms, q=quantum: scale * (terms + q), what)


def test_cross_entropy_per_row_upstream(impl):
    """reduction='none' with a per-row upstream gradient: each row its own scale, up to 1.5·2¹⁵."""
    s, _, y, _ = rows(64, 700, impl)
    up = (2.0 ** torch.randint(6, 16, (64,))).to(impl) * torch.rand(64, device=impl).add(0.5)
    terms = logit_terms(s, None, y, None, 1.0, 0.0, 1.0) * (y != -100).sum()  # ce_weight 1 per row, not 1/n
    check_op(
        lambda x: cross_entropy(x, y, reduction="none"),
        lambda x: F.cross_entropy(wide(x), y, reduction="none"),
        s,
        lambda scale: scale[:, None] * terms,
        "cross_entropy(none)",
        scales=[up],
    )


@pytest.mark.parametrize("n,h", [(256, 96), (2, 5000)], ids=["one-tile", "two-tiles"])
def test_cosine_loss(impl, n, h):
    t = torch.randn(n, h)
    s = (t + torch.randn(n, h)).half().to(impl)
    t = t.half().to(impl)
    s64, t64 = s.double(), t.double()
    ns, nt = s64.norm(dim=-1, keepdim=True), t64.norm(dim=-1, keepdim=True)
    cos = (s64 * t64).sum(-1, keepdim=True) / (ns * nt)
    terms = (t64.abs() / (ns * nt) + cos.abs() * s64.abs() / ns**2) / n  # the two terms of ∂(1 − cos)/∂s, mean
    check_op(
        lambda x: cosine_loss(x, t),
        lambda x: (1 - F.cosine_similarity(wide(x), wide(t, x), dim=-1, eps=1e-8)).mean(),
        s,
        lambda scale: scale * terms,
        "cosine_loss",
    )


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax(impl, log):
    """softmax forms no gradient in the forward, so this checks only that its backward keeps the scaled fp16
    gradient. Its output is fp16 like torch's on fp16 input, and the backward works from that rounded output, so the
    comparison is with torch's softmax on fp16 input, allowing for the rounding of y (2⁻¹¹ relative) in the noise."""
    x = (torch.randn(32, 700) * 3).half().to(impl)
    w = torch.randn(32, 700, device=impl)
    ours = log_softmax if log else softmax
    theirs = torch.log_softmax if log else torch.softmax
    y = theirs(x.double() / 2.0, -1)
    p = y.exp() if log else y
    c = (w.double().abs() * (1 if log else p)).sum(-1, keepdim=True)
    # y is rounded to fp16 (2⁻¹² relative; for log_softmax 2⁻¹²·|log p| in p = exp(y)): 2⁹ × 2⁻²⁰ of the terms.
    terms = (w.double().abs() * (1 if log else p) + p * (1 + (y.abs() if log else 0)) * c) / 2.0 / 32 * 2**9
    check_op(
        lambda x: (ours(x, 2.0).float() * w).sum() / 32,
        lambda x: (wide(theirs(x / 2.0, -1), x) * w).sum() / 32,
        x,
        lambda scale: scale * terms,
        "log_softmax" if log else "softmax",
        scales=[2.0**16, 2.0**10],  # the upstream reaches y in fp16: an edge scale would overflow it, as in torch
    )


@pytest.mark.parametrize("teacher", [True, False], ids=["distill", "cross_entropy"])
def test_fused_linear(impl, teacher):
    """fp16 hidden states and projection, no autocast: torch's unfused path in fp16 with an fp32 loss."""
    n, h, v = 48, 32, 300
    h_s, w_s, b_s = torch.randn(n, h).half(), (torch.randn(v, h) / h**0.5 * 3).half(), torch.randn(v).half()
    h_s, w_s, b_s = h_s.to(impl), w_s.to(impl), b_s.to(impl)
    h_t, w_t = torch.randn(n, h).half().to(impl), (torch.randn(v, h) / h**0.5 * 3).half().to(impl)
    y = torch.randint(0, v, (n,), device=impl)

    def ours(x, which):
        args = {"h": h_s, "w": w_s, "b": b_s} | {which: x}
        if teacher:
            return fused_linear_distill_loss(args["h"], args["w"], args["b"], h_t, w_t, None, y, chunk_size=16,
                                             kd_weight=5.0).loss  # fmt: skip
        return fused_linear_cross_entropy(args["h"], args["w"], args["b"], y, chunk_size=16)

    def theirs(x, which):
        args = {k: wide(a, x) for k, a in {"h": h_s, "w": w_s, "b": b_s}.items()} | {which: x}
        s = F.linear(args["h"].to(x.dtype), args["w"].to(x.dtype), args["b"].to(x.dtype))
        loss = F.cross_entropy(wide(s), y)
        if teacher:
            loss = loss + 5.0 * kl(wide(s), wide(F.linear(h_t, w_t), s), 2.0)
        return loss

    # The projection's backward sums products of the fp16-rounded logit gradient with h or W: allow 2⁻¹⁰ of the sum
    # of their magnitudes (noise is in units of 2⁻²⁰).
    s = F.linear(h_s.double(), w_s.double(), b_s.double()).requires_grad_()
    t = F.linear(h_t.double(), w_t.double())
    loss = F.cross_entropy(s, y) + (5.0 * kl(s, t, 2.0) if teacher else 0)
    (g_s,) = torch.autograd.grad(loss, s)
    mags = {"h": g_s.abs() @ w_s.double().abs(), "w": g_s.abs().t() @ h_s.double().abs(), "b": g_s.abs().sum(0)}
    for which, leaf in (("h", h_s), ("w", w_s), ("b", b_s)):
        check_op(
            lambda x, which=which: ours(x, which),
            lambda x, which=which: theirs(x, which),
            leaf,
            lambda scale, which=which: scale * 2**10 * mags[which],
            f"fused ∂/∂{which}",
        )


def test_fp16_scale_is_chosen_without_a_host_sync(impl):
    """K is computed on the device from device counts (a kd_mask, ignored labels): forward and backward stay
    sync-free in fp16, with the loss scale itself a device tensor, as the engine's scaler keeps it."""
    s, t, y, m = rows(16, 300, impl)
    h, w = torch.randn(16, 8, device=impl).half(), torch.randn(300, 8, device=impl).half()
    scale = torch.tensor(2.0**16, device=impl)
    x, hs = s.clone().requires_grad_(), h.clone().requires_grad_()
    with NoHostSync():
        loss = distill_loss(x, t, y, m).loss + cross_entropy(x, y) + kd_loss(x, t, m) + cosine_loss(x, t, m)
        loss = loss + fused_linear_distill_loss(hs, w, None, h, w, None, y, m, chunk_size=8).loss
        (loss * scale).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(hs.grad).all()
