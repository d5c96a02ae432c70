"""The input contract (kernels/_contract.py): every public op checks its inputs on the host, on both paths.

A Triton kernel trusts its shapes: a teacher with fewer rows or columns than the student, or labels shorter than the
rows, would be read out of bounds (on a GPU: whatever memory follows, a different number each run). So each op
rejects such inputs before launching, with a ValueError naming the argument, what it got and what it needs. A label
value cannot be checked on the host without a sync; one outside [0, V) (and not ignored) gives NaN loss and a NaN
gradient row on every path instead of a number.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kernels import (
    CosineLoss,
    CrossEntropyLoss,
    DistillLoss,
    KDLoss,
    Softmax,
    cosine_loss,
    cross_entropy,
    distill_loss,
    fused_linear_cross_entropy,
    fused_linear_distill_loss,
    kd_ce_rows,
    kd_loss,
    log_softmax,
    softmax,
)
from tests.kernels.common import NoHostSync

N, V, H = 5, 11, 8


def logits(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, device=device).to(dtype)


def labels(n=N, v=V, device="cpu"):
    return torch.randint(0, v, (n,), device=device)


def rows_mask(n=N, device="cpu"):
    return torch.rand(n, device=device) < 0.7


def fused_inputs(device, n=N, n_t=N, h_t=H, v=V, v_t=V, h_w=H):
    return dict(
        student_hidden=torch.randn(n, H, device=device, requires_grad=True),
        student_weight=torch.randn(v, h_w, device=device, requires_grad=True),
        student_bias=torch.randn(v, device=device),
        teacher_hidden=torch.randn(n_t, h_t, device=device),
        teacher_weight=torch.randn(v_t, h_t, device=device),
        teacher_bias=torch.randn(v_t, device=device),
        labels=labels(n, v, device),
    )


def raises(fn, *words):
    """fn() raises ValueError whose message contains every word (the argument's name, what it needs...)."""
    with pytest.raises(ValueError) as info:
        fn()
    for w in words:
        assert w in str(info.value), f"{w!r} not in {str(info.value)!r}"


# Shapes that are one row or a few columns off, shorter and longer: the shorter ones read out of bounds without a check.
@pytest.mark.parametrize("teacher_shape", [(N, V + 3), (N, V - 3), (N - 1, V), (N + 1, V), (V, N)])
def test_teacher_shape_must_equal_the_student_shape(impl, teacher_shape):
    s, t = logits(N, V, device=impl), logits(*teacher_shape, device=impl)
    raises(lambda: distill_loss(s, t, labels(device=impl)), "teacher_logits", str(tuple(teacher_shape)))
    raises(lambda: kd_loss(s, t), "teacher_logits")
    raises(lambda: kd_ce_rows(s, t, None, temperature=2.0), "teacher")


def test_kd_loss_does_not_reshape_a_transposed_teacher(impl):
    """(6, 4) has as many elements as (4, 6): a reshape would silently pair the wrong logits."""
    raises(lambda: kd_loss(logits(4, 6, device=impl), logits(6, 4, device=impl)), "teacher_logits", "(4, 6)")


@pytest.mark.parametrize("n", [N - 1, N + 1])
def test_row_vectors_must_have_one_entry_per_row(impl, n):
    s, t = logits(N, V, device=impl), logits(N, V, device=impl)
    raises(lambda: distill_loss(s, t, labels(n, device=impl)), "labels", f"({N},)")
    raises(lambda: distill_loss(s, t, labels(device=impl), rows_mask(n, device=impl)), "kd_mask", f"({N},)")
    raises(lambda: kd_loss(s, t, rows_mask(n, device=impl)), "kd_mask")
    raises(lambda: cross_entropy(s, labels(n, device=impl)), "labels")
    raises(lambda: cosine_loss(s, t, rows_mask(n, device=impl)), "mask")
    raises(lambda: kd_ce_rows(s, t, labels(n, device=impl)), "labels")


def test_leading_dims_must_match_too(impl):
    """(B, L, V) logits take (B, L) labels and masks; (L, B) or flat (B·L,) ones are someone else's layout."""
    s, t = logits(2, 3, V, device=impl), logits(2, 3, V, device=impl)
    raises(lambda: distill_loss(s, t, labels(6, device=impl).view(3, 2)), "labels", "(2, 3)")
    raises(lambda: cross_entropy(s, labels(6, device=impl)), "labels", "(2, 3)")
    assert torch.isfinite(distill_loss(s, t, labels(6, device=impl).view(2, 3)).loss)


def test_cosine_shapes(impl):
    s = logits(N, H, device=impl)
    for bad in [(N - 1, H), (N, H - 3), (N, H + 3)]:
        raises(lambda bad=bad: cosine_loss(s, logits(*bad, device=impl)), "teacher_hidden", str(bad))


@pytest.mark.parametrize("what", ["teacher_rows", "teacher_cols", "weight_cols", "labels", "kd_mask", "vocab"])
def test_fused_shapes(impl, what):
    kw = dict(
        teacher_rows=dict(n_t=N - 3),
        teacher_cols=dict(h_t=H + 2),
        weight_cols=dict(h_w=H + 1),
        vocab=dict(v_t=V - 3),
    ).get(what, {})
    inp = fused_inputs(impl, **kw)
    if what == "teacher_cols":
        inp["teacher_weight"] = torch.randn(V, H, device=impl)  # (V, H) against (N, H + 2) teacher rows
    if what == "labels":
        inp["labels"] = labels(N + 1, device=impl)
    mask = rows_mask(N - 1, device=impl) if what == "kd_mask" else None
    name = {
        "teacher_rows": "teacher_hidden",
        "teacher_cols": "teacher_weight",
        "weight_cols": "student_weight",
        "labels": "labels",
        "kd_mask": "kd_mask",
        "vocab": "teacher_weight",
    }[what]
    raises(lambda: fused_linear_distill_loss(**inp, kd_mask=mask), name)


def test_dtypes(impl):
    s, t, y = logits(N, V, device=impl), logits(N, V, device=impl), labels(device=impl)
    raises(lambda: softmax(torch.arange(6, device=impl).view(2, 3)), "x", "floating", "torch.int64")
    raises(lambda: log_softmax(torch.ones(2, 3, dtype=torch.bool, device=impl)), "x", "floating")
    raises(lambda: cross_entropy(s, y.float()), "labels", "integer")
    raises(lambda: cross_entropy(s.long(), y), "logits", "floating")
    raises(lambda: distill_loss(s, t, y, y), "kd_mask", "bool")
    raises(lambda: distill_loss(s, t.long(), y), "teacher_logits", "floating")
    raises(lambda: cosine_loss(s, t, y), "mask", "bool")
    raises(lambda: fused_linear_cross_entropy(s, logits(7, V, device=impl), None, y.float()), "labels", "integer")


def test_devices(impl):
    """A tensor on another device (meta stands in for a second device here) is named, not moved or misread."""
    s, t, y = logits(N, V, device=impl), logits(N, V, device=impl), labels(device=impl)
    elsewhere = torch.device("meta")
    raises(lambda: distill_loss(s, t.to(elsewhere), y), "teacher_logits", "meta")
    raises(lambda: cross_entropy(s, y.to(elsewhere)), "labels", "meta")
    raises(lambda: cosine_loss(s, t, rows_mask(device=impl).to(elsewhere)), "mask")
    inp = fused_inputs(impl)
    inp["teacher_hidden"] = inp["teacher_hidden"].to(elsewhere)
    raises(lambda: fused_linear_distill_loss(**inp), "teacher_hidden", "meta")


@pytest.mark.parametrize("temperature", [np.float32(2.0), np.float64(2.0), torch.tensor(2.0), 2])
def test_temperature_as_numpy_or_0dim_tensor(impl, temperature):
    s, t, y = logits(N, V, device=impl), logits(N, V, device=impl), labels(device=impl)
    expected = distill_loss(s, t, y, temperature=2.0)
    got = distill_loss(s, t, y, temperature=temperature)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(kd_loss(s, t, temperature=temperature), expected.kd, atol=0, rtol=0)
    torch.testing.assert_close(softmax(s, temperature), softmax(s, 2.0), atol=0, rtol=0)
    assert KDLoss(temperature).temperature == 2.0 and DistillLoss(temperature).temperature == 2.0


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.inf, math.nan, True, "2", torch.ones(2), None])
def test_bad_temperatures_are_named(impl, temperature):
    s, t = logits(N, V, device=impl), logits(N, V, device=impl)
    raises(lambda: distill_loss(s, t, temperature=temperature), "temperature", repr(temperature)[:6])
    raises(lambda: kd_loss(s, t, temperature=temperature), "temperature")
    raises(lambda: softmax(s, temperature), "temperature")
    raises(lambda: Softmax(temperature), "temperature")


def test_missing_or_misplaced_arguments_are_named(impl):
    s, y = logits(N, V, device=impl), labels(device=impl)
    raises(lambda: distill_loss(s, None, y), "teacher_logits", "None")
    raises(lambda: kd_loss(s, None), "teacher_logits")
    raises(lambda: cross_entropy(s, None), "labels")
    raises(lambda: cosine_loss(s, None), "teacher_hidden")
    raises(lambda: cross_entropy(s, y, reduction="avg"), "reduction", "'avg'")
    raises(lambda: cross_entropy(s, y, label_smoothing=1.5), "label_smoothing", "1.5")
    raises(lambda: cross_entropy(s, y, ignore_index=1.5), "ignore_index", "1.5")
    raises(lambda: CrossEntropyLoss(reduction="avg"), "reduction")
    raises(lambda: distill_loss(s, s, y, kd_weight="1"), "kd_weight")
    raises(lambda: distill_loss(logits(N, 0, device=impl), logits(N, 0, device=impl)), "student_logits", "V ≥ 1")


@pytest.mark.parametrize("chunk_size", [0, -2, 2.5, True])
def test_fused_chunk_size(impl, chunk_size):
    inp = fused_inputs(impl)
    raises(lambda: fused_linear_distill_loss(**inp, chunk_size=chunk_size), "chunk_size", repr(chunk_size))
    h, w, y = inp["student_hidden"], inp["student_weight"], inp["labels"]
    raises(lambda: fused_linear_cross_entropy(h, w, None, y, chunk_size=chunk_size), "chunk_size")
    raises(lambda: fused_linear_cross_entropy(h, w, None, y, memory_budget_bytes=0), "memory_budget_bytes")


def test_fused_needs_a_teacher_projection_with_teacher_rows(impl):
    inp = fused_inputs(impl)
    raises(lambda: fused_linear_distill_loss(**{**inp, "teacher_weight": None}), "teacher_weight")
    raises(lambda: fused_linear_distill_loss(**{**inp, "teacher_hidden": None}), "teacher_hidden")


def test_checks_read_no_device_value(impl):
    """Everything above is decided from metadata: the checks themselves never sync."""
    s, t, y, m = logits(N, V, device=impl), logits(N, V, device=impl), labels(device=impl), rows_mask(device=impl)
    with NoHostSync():
        distill_loss(s, t, y, m, temperature=np.float32(2.0))
        cross_entropy(s, y)
        cosine_loss(s, t, m)
        softmax(s, 2.0)
        fused_linear_distill_loss(**fused_inputs(impl), chunk_size=2)


# Out-of-range labels: a label value is device data, so it is not checked on the host; its row turns NaN instead.
BAD_LABELS = [V, V + 7, -1, -101, 10**6, 2**31, 2**32 + 3]


def _with_bad_label(impl, bad):
    y = labels(device=impl)
    y[0] = -100  # an ignored row stays ignored
    y[2] = bad
    return y


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy reports the NaN row
@pytest.mark.parametrize("bad", BAD_LABELS)
def test_out_of_range_label_gives_nan_loss_and_nan_gradient_row(impl, bad):
    s, t, m = logits(N, V, device=impl), logits(N, V, device=impl), rows_mask(device=impl)
    y = _with_bad_label(impl, bad)
    ok = torch.tensor([0, 1, 3, 4], device=impl)
    for fn in (
        lambda x: distill_loss(x, t, y, m).loss,
        lambda x: cross_entropy(x, y),
        lambda x: cross_entropy(x, y, label_smoothing=0.1),
        lambda x: cross_entropy(x, y, reduction="none")[2],
        lambda x: CrossEntropyLoss(reduction="sum")(x, y),
    ):
        x = s.clone().requires_grad_()
        loss = fn(x)
        loss.backward()
        assert loss.isnan(), f"label {bad}: loss {loss.item()}"
        assert x.grad[2].isnan().all(), f"label {bad}: gradient row {x.grad[2]}"
        assert torch.isfinite(x.grad[ok]).all()  # other rows keep their (finite) gradients
    # Row by row, the other rows are untouched: the per-row losses equal those without the bad row.
    ce = cross_entropy(s, y, reduction="none")
    assert ce[2].isnan() and ce[0] == 0
    ref = F.cross_entropy(s[ok], y[ok].clamp_min(0), reduction="none").where(y[ok] != -100, 0)
    torch.testing.assert_close(ce[ok], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("bad", [V, -1, 2**32 + 3])
def test_out_of_range_label_in_the_fused_loss(impl, bad):
    inp = fused_inputs(impl)
    inp["labels"] = _with_bad_label(impl, bad)
    out = fused_linear_distill_loss(**inp, chunk_size=2)
    grad_h, grad_w = torch.autograd.grad(out.loss, [inp["student_hidden"], inp["student_weight"]])
    assert out.loss.isnan() and out.ce.isnan()
    assert grad_h[2].isnan().all() and grad_w.isnan().any()
    out = fused_linear_cross_entropy(inp["student_hidden"], inp["student_weight"], None, inp["labels"])
    assert out.isnan()


def test_a_custom_ignore_index_is_ignored_not_out_of_range(impl):
    s = logits(N, V, device=impl)
    y = labels(device=impl)
    y[1] = -1
    torch.testing.assert_close(cross_entropy(s, y, ignore_index=-1), F.cross_entropy(s, y, ignore_index=-1))
    y[1] = V  # also an ignore_index outside [0, V), as HF's QA heads use
    torch.testing.assert_close(cross_entropy(s, y, ignore_index=V), F.cross_entropy(s, y, ignore_index=V))


def test_modules_check_too(impl):
    s, t = logits(N, V, device=impl), logits(N - 1, V, device=impl)
    raises(lambda: DistillLoss()(s, t), "teacher_logits")
    raises(lambda: KDLoss()(s, t), "teacher_logits")
    raises(lambda: CosineLoss()(s, t), "teacher_hidden")
