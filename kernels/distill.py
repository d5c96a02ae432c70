"""Single-pass distillation loss on logits: temperature KD (KL) and hard-label cross-entropy, fused.

Per row n with student logits s, teacher logits t (a constant), temperature T, label y, smoothing ε:

    p_s = softmax(s/T),  p_t = softmax(t/T),  q = softmax(s)
    kd_row[n] = T² Σ_v p_t,v (log p_t,v − log p_s,v)              (0 where kd_mask[n] is False)
    ce_row[n] = (1−ε)(lse(s) − s_y) + ε (lse(s) − mean_v s_v)      (0 where y == ignore_index)

Gradient with respect to s, using ∂ log softmax(s/T)_v / ∂s_u = (δ_uv − p_s,u)/T:

    ∂kd_row/∂s = T² · (p_s − p_t)/T = T (p_s − p_t)
    ∂ce_row/∂s = q − (1−ε) onehot(y) − ε/V
    grad[n]    = kd_scale · T (p_s − p_t) + ce_scale · (q − (1−ε) onehot(y) − ε/V)

kd_scale and ce_scale are the weights of the row terms in the caller's loss (weight / count for a mean); they enter
the gradient only. The losses form this gradient in forward and the backward (`kernels._grad.scale_grad_`) multiplies
it in place by the upstream gradient; for fp16 the forward folds a power of two K into both scales so that the stored
gradient keeps its bits under a loss scale (the design and its accuracy are in `kernels._grad`).

One program per row (per BLOCK_N rows when V is small); pass 1 walks the row in V-blocks with an online softmax
(Milakov & Gimelshein, 2018) and folds the KL in without a third pass. Every statistic is kept relative to the row's
running maximum of the raw logits, M_s = max s and M_t = max t (the maximum of s/T for any T > 0 is M_s/T), so that
no term carries the size of the logits themselves, only their spread:

    x_v = s_v − M_s,  u_v = t_v − M_t                                   (≤ 0, exact up to the spread's rounding)
    d_s = Σ exp(x/T),  d_1 = Σ exp(x),  d_t = Σ w,  w_v = exp(u_v/T),  A = Σ w_v (u_v − x_v)/T
    KL  = Σ p_t (log p_t − log p_s) = A/d_t − log d_t + log d_s
    CE  = lse(s) − s_y + ε(s_y − mean s) = (M_s − s_y) + log d_1 − ε Σ_v (s_v − s_y)/V
    p_s = exp(x/T − log d_s),  p_t = exp(u/T − log d_t),  q = exp(x − log d_1)

Forming lse = M + log d and then s − lse would round at |M| (fp32 keeps ~2⁻²⁴·|M|: 6e-4 at 1e4, where the answer
is accurate to 1e-7), and the textbook fold KL = A'/d_t + (m_s − m_t) + ... with A' = Σ w (t − s)/T cancels two
terms of the maxima's size when student and teacher sit at different offsets; dividing by T before subtracting the
maximum would round at |s/T|. Here the only subtractions of large numbers are s − M_s, t − M_t and M_s − s_y, all
between entries of the same row. When a running maximum grows from M to M', the sums are rescaled by exp((M − M')/T)
(exp(M − M') for d_1) and every term of A shifts by the change of the two maxima, so
A ← exp((M_t − M_t')/T) · (A + d_t·((M_t − M_t') − (M_s − M_s'))/T); while a row has seen only −inf its maximum
counts as 0 (−inf − (−inf) would be NaN). Pass 2 writes the gradient.

NaN and −inf. Entries of −inf are probabilities of 0 (masked vocabulary): teacher −inf entries add 0·log 0 = 0, and a
student −inf where the teacher has mass makes KL = +inf. A NaN anywhere in a selected row (student or teacher), or a
teacher row that is −inf throughout (no distribution), gives a NaN row loss and a NaN gradient row, as torch does; a
row that is not selected (kd_mask False and label ignored) gives 0 whatever it holds. A label outside [0, V) that is
not `ignore_index` gives a NaN CE row and NaN gradient row: labels are device data, so the range is checked in the
kernel, not on the host, and nothing is read at the bad index. Labels are compared as 64-bit integers (2³² + 3 is
out of range, not class 3).

Memory traffic (the trade-off): when the row fits one block (V ≤ BLOCK) the tiles stay in registers and HBM sees
exactly one read of s and t and one write of the gradient. Wider rows are read twice by the program; the second
read follows the first within microseconds and mostly hits L2 (a 30522-wide bf16 row pair is 122 KB; ~130 SMs with
two resident rows each keep ~32 MB in flight, under H100's 50 MB L2). Keeping the row on chip instead would need
122 KB of registers per program, which spills. The label logit s_y is read in pass 1, so the gradient may be
written over s itself (`grad_out=student`): each block is read before it is overwritten.
"""

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from kernels import _contract as check
from kernels import _kd_ce
from kernels._dispatch import use_triton
from kernels._kd_ce import (
    DistillLossOutput,
    WeightedLossModule,
    ce_grad,
    ce_row,
    flat_rows,
    row_setup,
    shift,
    store_rows,
)
from kernels._tiles import kd_ce_tiles, round_to
from kernels.reference import kd_ce_rows_reference


@triton.jit
def _log_ratio(a, b):
    """log(a/b) as log1p((a − b)/b), Goldberg's form (exact-ish for a ≈ b, where log a − log b would lose the
    difference to the rounding of two logs of the size of log V): KL = A/d_t + log(d_s/d_t) is small when the
    student matches its teacher, and these two terms are all there is."""
    r = (a - b) / b
    one_r = 1.0 + r
    return tl.where(one_r == 1.0, r, tl.log(one_r) * (r / (one_r - 1.0)))


@triton.jit
def _load_tile(s_ptr, t_ptr, rows, offs, mask, stride_s, stride_t, HAS_TEACHER: tl.constexpr):
    """Student and teacher tiles (BLOCK_N, BLOCK), widened once from their stored dtype to fp32; −inf if masked."""
    s = tl.load(s_ptr + rows[:, None] * stride_s + offs[None, :], mask=mask, other=float("-inf")).to(tl.float32)
    t = s
    if HAS_TEACHER:
        t = tl.load(t_ptr + rows[:, None] * stride_t + offs[None, :], mask=mask, other=float("-inf"))
        t = t.to(tl.float32)
    return s, t


@triton.jit
def _stats_tile(
    m_s, d_s, d_1, m_t, d_t, a_t, s_sum, s, t, mask, s_ref, inv_t,
    HAS_TEACHER: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_SMOOTHING: tl.constexpr, ONE_TEMP: tl.constexpr,
):  # fmt: skip
    """Pass-1 update with one tile: running maxima M_s, M_t and the sums d_s, d_1, d_t, A, Σ(s − s_y) relative to
    them (the module docstring's definitions)."""
    m_s_new = tl.maximum(m_s, tl.max(s, axis=1))
    sh_old, sh_s = shift(m_s), shift(m_s_new)
    x = s - sh_s[:, None]
    # Rescale factors from the raw old maximum: exp(−inf) = 0 empties a sum that has seen nothing (a shift of 0
    # there would give exp(+large)·0 = NaN when the new maximum is very negative).
    d_s = d_s * tl.exp((m_s - sh_s) * inv_t) + tl.sum(tl.exp(x * inv_t), axis=1)
    if HAS_LABELS:
        if not ONE_TEMP:
            d_1 = d_1 * tl.exp(m_s - sh_s) + tl.sum(tl.exp(x), axis=1)
        if HAS_SMOOTHING:
            s_sum += tl.sum(tl.where(mask, s - s_ref[:, None], 0.0), axis=1)
    if HAS_TEACHER:
        m_t_new = tl.maximum(m_t, tl.max(t, axis=1))
        sh_t_old, sh_t = shift(m_t), shift(m_t_new)
        u = t - sh_t[:, None]
        alpha = tl.exp((m_t - sh_t) * inv_t)
        w = tl.exp(u * inv_t)
        # Old terms shift by the change of both maxima (both shifts finite; d_t = 0 while nothing was seen). An A
        # that became +inf (p_t > 0 where p_s = 0) must not turn into inf·0 when its weight underflows.
        a_t = a_t + d_t * ((sh_t_old - sh_t) - (sh_old - sh_s)) * inv_t
        a_t = tl.where(alpha > 0.0, a_t * alpha, 0.0)
        # p_t = 0 entries (t = −inf) add 0·log 0 = 0: zero the difference there, as −inf − (−inf) = NaN. A NaN w
        # fails the test and still poisons the sum through the product, as a NaN difference does.
        a_t += tl.sum(w * tl.where(w > 0.0, u - x, 0.0), axis=1) * inv_t
        d_t = d_t * alpha + tl.sum(w, axis=1)
        m_t = m_t_new
    return m_s_new, d_s, d_1, m_t, d_t, a_t, s_sum


@triton.jit
def _grad_tile(
    s, t, offs, y, kd_on, ce_on, in_range, kd_coef, ce_coef, inv_t, sh_s, sh_t, log_ds, log_dt, log_d1, smoothing, V,
    HAS_TEACHER: tl.constexpr, HAS_LABELS: tl.constexpr,
):  # fmt: skip
    """grad = kd_coef·(p_s − p_t) + ce_coef·(q − (1−ε)·onehot(y) − ε/V) in fp32, kd_coef = kd_scale·T."""
    x = s - sh_s[:, None]
    g = tl.zeros(s.shape, dtype=tl.float32)
    if HAS_TEACHER:
        p_s = tl.exp(x * inv_t - log_ds[:, None])
        p_t = tl.exp((t - sh_t[:, None]) * inv_t - log_dt[:, None])
        g = tl.where(kd_on[:, None], kd_coef * (p_s - p_t), 0.0)  # where, not a 0 factor: ignored rows may hold NaN
    if HAS_LABELS:
        g += ce_grad(x, offs[None, :], y, ce_on, in_range, ce_coef, log_d1, smoothing, V)
    return g


@triton.jit
def _kd_ce_fwd_kernel(
    s_ptr,  # (N, V) student logits, fp32/bf16/fp16, unit column stride
    t_ptr,  # (N, V) teacher logits, fp32/bf16/fp16, unit column stride (unused without HAS_TEACHER)
    y_ptr,  # (N,) int32/int64 labels (unused without HAS_LABELS)
    kd_mask_ptr,  # (N,) uint8 KD row mask (unused without HAS_KD_MASK)
    kd_scale_ptr,  # () fp32
    ce_scale_ptr,  # () fp32
    kd_row_ptr,  # (N,) fp32 out
    ce_row_ptr,  # (N,) fp32 out
    g_ptr,  # (N, V) student dtype out, may alias s_ptr (unused without COMPUTE_GRAD)
    N,
    V,
    stride_s,
    stride_t,
    stride_g,
    inv_t,
    temperature,
    smoothing,
    ignore_index,
    HAS_TEACHER: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_KD_MASK: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    ONE_TEMP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # BLOCK_N rows per program (many for small V, 1 for wide rows); s_y is read before pass 2 may overwrite s.
    out_rows, row_ok, rows, kd_on, ce_on, in_range, y, s_y = row_setup(
        s_ptr, y_ptr, kd_mask_ptr, N, V, stride_s, ignore_index, HAS_LABELS, HAS_KD_MASK, BLOCK_N
    )
    cols = tl.arange(0, BLOCK)

    # Pass 1: statistics. A single tile stays in registers for pass 2 (one HBM read); wider rows loop.
    m_s = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    d_s = tl.zeros([BLOCK_N], dtype=tl.float32)
    d_1, m_t, d_t, a_t, s_sum = d_s, m_s, d_s, d_s, d_s
    if SINGLE_TILE:
        mask = (cols < V)[None, :]
        s, t = _load_tile(s_ptr, t_ptr, rows, cols, mask, stride_s, stride_t, HAS_TEACHER)
        m_s, d_s, d_1, m_t, d_t, a_t, s_sum = _stats_tile(
            m_s, d_s, d_1, m_t, d_t, a_t, s_sum, s, t, mask, s_y, inv_t,
            HAS_TEACHER, HAS_LABELS, HAS_SMOOTHING, ONE_TEMP,
        )  # fmt: skip
    else:
        for start in range(0, V, BLOCK):
            mask = (start + cols < V)[None, :]
            s_b, t_b = _load_tile(s_ptr, t_ptr, rows, start + cols, mask, stride_s, stride_t, HAS_TEACHER)
            m_s, d_s, d_1, m_t, d_t, a_t, s_sum = _stats_tile(
                m_s, d_s, d_1, m_t, d_t, a_t, s_sum, s_b, t_b, mask, s_y, inv_t,
                HAS_TEACHER, HAS_LABELS, HAS_SMOOTHING, ONE_TEMP,
            )  # fmt: skip

    sh_s, sh_t = shift(m_s), shift(m_t)
    log_ds = tl.log(d_s)
    log_dt, log_d1 = log_ds, log_ds
    kd = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_TEACHER:
        log_dt = tl.log(d_t)
        kl = a_t / d_t + _log_ratio(d_s, d_t)
        kd = tl.where(kd_on, kl * (temperature * temperature), 0.0)  # where, not a 0 factor: NaN rows give 0
    if HAS_LABELS and not ONE_TEMP:
        log_d1 = tl.log(d_1)
    ce = ce_row(sh_s, s_y, log_d1, s_sum, smoothing, V, ce_on, in_range, HAS_LABELS, HAS_SMOOTHING)
    store_rows(kd_row_ptr, ce_row_ptr, out_rows, row_ok, kd, ce)

    # Pass 2: the gradient, rounded once to the student dtype.
    if COMPUTE_GRAD:
        kd_coef = tl.load(kd_scale_ptr) * temperature
        ce_coef = tl.load(ce_scale_ptr)
        if SINGLE_TILE:
            g = _grad_tile(
                s, t, cols, y, kd_on, ce_on, in_range, kd_coef, ce_coef, inv_t, sh_s, sh_t, log_ds, log_dt, log_d1,
                smoothing, V, HAS_TEACHER, HAS_LABELS,
            )  # fmt: skip
            g_ptrs = g_ptr + out_rows[:, None] * stride_g + cols[None, :]
            tl.store(g_ptrs, round_to(g, g_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < V)[None, :])
        else:
            for start in range(0, V, BLOCK):
                mask = (start + cols < V)[None, :]
                s_b, t_b = _load_tile(s_ptr, t_ptr, rows, start + cols, mask, stride_s, stride_t, HAS_TEACHER)
                g = _grad_tile(
                    s_b, t_b, start + cols, y, kd_on, ce_on, in_range, kd_coef, ce_coef, inv_t, sh_s, sh_t, log_ds,
                    log_dt, log_d1, smoothing, V, HAS_TEACHER, HAS_LABELS,
                )  # fmt: skip
                g_ptrs = g_ptr + out_rows[:, None] * stride_g + (start + cols)[None, :]
                tl.store(g_ptrs, round_to(g, g_ptr.dtype.element_ty), mask=row_ok[:, None] & mask)


def kd_ce_fwd(student, teacher, labels, kd_mask, temperature, kd_scale, ce_scale, label_smoothing, ignore_index,
              compute_grad, grad_out):  # fmt: skip
    """Launch `_kd_ce_fwd_kernel`; arguments and returns as `kd_ce_rows` (inputs already validated)."""
    n, v = student.shape
    student = _kd_ce.unit_columns(student)
    teacher = None if teacher is None else _kd_ce.unit_columns(teacher)
    kd_row, ce_row, grad, y, m, kd_scale, ce_scale = _kd_ce.launch_buffers(
        student, labels, kd_mask, kd_scale, ce_scale, compute_grad, grad_out
    )
    if n == 0:
        return kd_row, ce_row, grad
    block_n, block, num_warps = kd_ce_tiles(v, student.dtype)
    t, g = (student if x is None else x for x in (teacher, grad))  # the student stands in for absent tensors
    _kd_ce_fwd_kernel[(triton.cdiv(n, block_n),)](
        student, t, y, m, kd_scale, ce_scale, kd_row, ce_row, g,
        n, v,
        student.stride(0), t.stride(0), g.stride(0),
        1.0 / temperature, float(temperature), float(label_smoothing), int(ignore_index),
        HAS_TEACHER=teacher is not None, HAS_LABELS=labels is not None, HAS_KD_MASK=kd_mask is not None,
        HAS_SMOOTHING=label_smoothing > 0, ONE_TEMP=temperature == 1.0, COMPUTE_GRAD=compute_grad,
        SINGLE_TILE=v <= block, BLOCK_N=block_n, BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    if grad_out is not None:
        torch.autograd.graph.increment_version(grad_out)  # written behind autograd's back
    return kd_row, ce_row, grad


def kd_ce_rows(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    labels: torch.Tensor | None,
    kd_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    kd_scale: float | torch.Tensor = 0.0,
    ce_scale: float | torch.Tensor = 0.0,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    compute_grad: bool = True,
    grad_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row KD and CE losses and the student-logit gradient in one pass (contract: `kd_ce_rows_reference`).

    Args:
        student: (N, V) float logits, V ≥ 1; rows may be strided (a copy is made if columns are not contiguous).
        teacher: (N, V) float logits, or None (CE only). Must not require grad.
        labels: (N,) integer class ids in [0, V) or `ignore_index`, or None (KD only). A label outside [0, V) gives
            a NaN CE row and a NaN gradient row (checked on the device: a host check would sync).
        kd_mask: (N,) bool, rows that take the KD term; None: all rows.
        temperature: T > 0 for the KD term (CE always uses T = 1).
        kd_scale, ce_scale: weights of each row's KD/CE term in the caller's loss, floats or () fp32 device tensors
            (never read on the host); they scale only the gradient.
        label_smoothing: ε in [0, 1]. ignore_index: label of rows without CE.
        compute_grad: whether to write the gradient.
        grad_out: optional (N, V) buffer of the student dtype with unit column stride for the gradient; may be
            `student` itself (each row is read in full before it is overwritten).

    Returns:
        kd_row (N,) fp32, ce_row (N,) fp32 (fp64 for fp64 inputs), grad (N, V) student dtype or None.
        fp64 inputs, and CPU tensors outside Triton's interpreter, run the reference. ValueError for inputs outside
        this contract (`kernels._contract`).
    """
    check.tensor("student", student, "float", ndim=2)
    check.logits("student", student)
    check.optional_tensor("teacher", teacher, shape=student.shape, device=student.device)
    check.constant("teacher", teacher)
    temperature, kd_scale, ce_scale, label_smoothing, ignore_index = _kd_ce.check_row_args(
        student, labels, kd_mask, temperature, kd_scale, ce_scale, label_smoothing, ignore_index, grad_out
    )
    if use_triton(student, teacher, labels, kd_mask):
        return kd_ce_fwd(student, teacher, labels, kd_mask, temperature, kd_scale, ce_scale, label_smoothing,
                         ignore_index, compute_grad, grad_out)  # fmt: skip
    with torch.no_grad():
        kd_row, ce_row, grad = kd_ce_rows_reference(student, teacher, labels, kd_mask, temperature, kd_scale,
                                                    ce_scale, label_smoothing, ignore_index, compute_grad)  # fmt: skip
        if grad_out is not None and grad is not None:
            grad = grad_out.copy_(grad)
    return kd_row, ce_row, grad


class KDCELossFunction(torch.autograd.Function):
    """kd_weight·KD + ce_weight·CE over rows; the student gradient is made in forward and scaled in backward."""

    @staticmethod
    def forward(ctx, student, teacher, labels, kd_mask, temperature, kd_weight, ce_weight, ignore_index):
        # fp16: the stored gradient is K·grad, K a power of two that keeps it in range under a loss scale.
        n_kd, n_ce, kd_scale, ce_scale, k = _kd_ce.loss_scales(
            student, labels, kd_mask, teacher is not None, temperature, kd_weight, ce_weight, ignore_index
        )
        kd_row, ce_row, grad = kd_ce_rows(
            student, teacher, labels, kd_mask, temperature, kd_scale * k, ce_scale * k,
            ignore_index=ignore_index, compute_grad=ctx.needs_input_grad[0],
        )  # fmt: skip
        return _kd_ce.weighted_means(ctx, kd_row, ce_row, grad, n_kd, n_ce, k, kd_weight, ce_weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_kd, grad_ce):
        return _kd_ce.stored_grad_backward(ctx, grad_loss, 8)


def check_logits_rows(student_logits, teacher_logits, labels, kd_mask, temperature, ignore_index):
    """The contract shared by `distill_loss` and `kd_loss` (argument names as theirs); returns (T, ignore_index)."""
    check.logits("student_logits", student_logits)
    check.like("teacher_logits", teacher_logits, student_logits)
    check.constant("teacher_logits", teacher_logits)
    return _kd_ce.check_label_rows(student_logits, labels, kd_mask, temperature, ignore_index)


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    kd_mask: torch.Tensor | None = None,
    temperature: float = 2.0,
    kd_weight: float = 1.0,
    ce_weight: float = 1.0,
    ignore_index: int = -100,
) -> DistillLossOutput:
    """DistilBERT's KD + MLM loss on logits in one pass: KLDivLoss(batchmean)·T² over KD rows plus CE (T = 1).

    Args:
        student_logits: (..., V) fp32/bf16/fp16 (fp64 runs the reference), V ≥ 1.
        teacher_logits: (..., V) float, the student's shape and device; a constant: it must not require grad.
        labels: (...) int class ids, `ignore_index` for rows without one; None: no CE term. A label outside [0, V)
            that is not `ignore_index` makes `loss`, `ce` and that row's gradient NaN.
        kd_mask: (...) bool, rows that take the KD term (DistilBERT: non-pad tokens); None: all rows.
        temperature: T > 0: a Python or NumPy number or a 0-dim CPU tensor.
        kd_weight, ce_weight: weights of the two means in `loss` (numbers or 0-dim tensors).

    Returns:
        DistillLossOutput of () fp32 tensors. Means divide by on-device counts clamped to ≥ 1, so no selected row
        gives 0 loss and 0 gradient; NaN in a selected row gives NaN. Only `loss` is differentiable (kd and ce are
        marked non-differentiable).

    Raises:
        ValueError naming the argument, for inputs outside this contract (checked on the host, no device sync).
    """
    temperature, ignore_index = check_logits_rows(student_logits, teacher_logits, labels, kd_mask, temperature,
                                                  ignore_index)  # fmt: skip
    kd_weight, ce_weight = check.weight("kd_weight", kd_weight), check.weight("ce_weight", ce_weight)
    s, labels = flat_rows(student_logits, labels)
    t, kd_mask = flat_rows(teacher_logits, kd_mask)
    if torch.compiler.is_compiling():  # one registered op for torch.compile (kernels._library); eager never comes here
        from kernels import _library

        return DistillLossOutput(*_library.distill_loss(s, t, labels, kd_mask, temperature, kd_weight, ce_weight,
                                                        ignore_index))  # fmt: skip
    out = KDCELossFunction.apply(s, t, labels, kd_mask, temperature, kd_weight, ce_weight, ignore_index)
    return DistillLossOutput(*out)


class DistillLoss(WeightedLossModule):
    """Module form of `distill_loss` (KD + CE in one pass): DistillLoss(temperature=2.0, kd_weight=1.0,
    ce_weight=1.0, ignore_index=-100)."""

    def forward(self, student_logits, teacher_logits, labels=None, kd_mask=None) -> DistillLossOutput:
        return distill_loss(student_logits, teacher_logits, labels, kd_mask, self.temperature, self.kd_weight,
                            self.ce_weight, self.ignore_index)  # fmt: skip
