"""Sparse-target distillation: KD against a teacher's stored top-K logits and tail mass, plus hard-label CE, fused.

A teacher cache (`engine.teacher_cache`) keeps per row only the teacher's K largest logits t_k, their vocabulary ids
i_k and its log-sum-exp at T, L = log Σ_v exp(t_v/T) over the whole row. That is enough for the kept probabilities
exactly and for the mass outside them:

    q_k = exp(t_k/T − L),   q_tail = 1 − Σ_k q_k                               (q_tail = 0 when K = V)

With the student's p = softmax(z/T) over all V entries and its mass outside the kept ids s_tail = 1 − Σ_k p_{i_k},
the loss is T²·KL between the two distributions over K + 1 buckets (the K ids, and "anything else"):

    kd_row[n] = T² [Σ_k q_k (log q_k − log p_{i_k}) + q_tail (log q_tail − log s_tail)]   (0 where kd_mask is False)
    ce_row[n] = (1−ε)(lse(z) − z_y) + ε (lse(z) − mean_v z_v)                             (0 where y == ignore_index)

When K covers the support (K = V: classes, QA positions, a small vocabulary) the tail is empty and kd_row is exactly
the dense `kernels.distill` KD; for K < V it is a lower bound on the dense KL (bucketing can only lose information,
by the log-sum inequality) that is tight when the teacher's tail follows the student's within the tail.

Gradient with respect to the student logits z_v, with ∂ log p_u/∂z_v = (δ_uv − p_v)/T and Q = Σ_k q_k = 1 − q_tail:

    ∂/∂z_v [−Σ_k q_k log p_{i_k}] = −Σ_k q_k (δ_{i_k v} − p_v)/T = (Q p_v − [v∈K] q_v)/T
    ∂s_tail/∂z_v = Σ_{u∉K} p_u (δ_uv − p_v)/T = ([v∉K] p_v − s_tail p_v)/T
    ∂/∂z_v [−q_tail log s_tail] = −(q_tail/s_tail)([v∉K] p_v − s_tail p_v)/T = (q_tail p_v − [v∉K] r p_v)/T,
                                  r = q_tail/s_tail

(the q log q terms are constants). Summed, with Q + q_tail = 1, and times T²:

    ∂kd_row/∂z_v = T (p_v − q_v)        for v ∈ K       (the dense gradient at the kept ids)
                 = T p_v (1 − r)        for v ∉ K       (the tail entries move together, scaled by 1 − q_tail/s_tail)
    grad[n]      = kd_scale · ∂kd_row/∂z + ce_scale · (softmax(z) − (1−ε) onehot(y) − ε/V)

Stored targets may sum past 1 by rounding (fp32 logits and L; K = V, or a tail of mass below ~1e-7 clamped to 0), so
the op uses Q' = Q + q_tail for the 1 above: T(Q'p_v − q_v) and T p_v (Q' − r), the exact gradient of the loss it
reports (equal to the above whenever q_tail > 0), which still sums to 0 over the row.

The tail gradient pushes the student's tail mass toward the teacher's: it is positive (mass taken out) when
s_tail > q_tail and negative when s_tail < q_tail, and the gradient sums to 0 over the row: T(s_tail − q_tail) over the
tail and T(q_tail − s_tail) over the kept ids. `tests/kernels/test_sparse_kd.py` checks it against fp64 autograd.
r = 0 where q_tail = 0 or s_tail = 0 (a tail the student rules out has p_v = 0 there: the gradient is 0, and the loss
+inf when q_tail > 0, as the dense KL is where the student rules out teacher mass).

The kernel. One program per row (per BLOCK_N rows when V is small), in these walks, statistics in fp32:
  0. (K < V) the kept entries' student maximum M_K = max_k z_{i_k} (a gather of K entries);
  1. the student row in V-blocks with an online softmax whose running maximum starts at M_K (M = max z at the end;
     d_s = Σ exp((z − M)/T), and d_1 = Σ exp(z − M) for the CE), as `kernels.distill` does;
  2. the K kept entries in K-blocks: z at the kept ids (a gather), q_k, d_K = Σ_k exp((z_{i_k} − M)/T) and
     A = Σ_k q_k (log q_k − (z_{i_k} − M)/T), so that
         KL = A + Q log d_s + q_tail (log q_tail − log s_tail),   s_tail = (d_s − d_K)/d_s;
  3. the gradient: every entry of the row is written with the tail formula, then (after a block barrier) the K kept
     entries are overwritten with theirs: a scatter, so nothing ever tests which entries are kept (membership would
     cost K compares per vocabulary entry).
The student's tail mass comes from a difference, d_s − d_K, which loses everything in fp32 when the student puts
nearly all its mass on the kept ids (s_tail ≈ 1e-6 has ~10% error; the KL term q_tail·log s_tail inherits it). Two
things keep it accurate: d_s and d_K are summed in fp64 (one conversion and add per entry), and the running maximum
starts at M_K, so the online softmax rescales only if a tail entry beats every kept one. Without a rescale, the terms
d_s and d_K share are bit for bit equal (the same fp32 exp of the same difference) and cancel exactly: s_tail carries
only the fp64 rounding of the sums, ~2⁻⁵³·d_s (fp32 accuracy down to s_tail ≈ 1e-9). With one, the tail holds the
row's maximum, so s_tail ≥ d_K/(K·d_s), and the rescaled terms' ~3 ulp error costs at most ~3·2⁻²⁴·K relative.
log q_k = t_k/T − L is formed directly (no exp/log round trip); kept entries with t_k = −inf have q_k = 0 and add
nothing (0·log 0 = 0).

In place: `grad_out=student` writes the gradient over the logits (as `kernels.distill`); the launcher then gathers
z at the kept ids first (an (N, K) copy), since walk 3 overwrites the row before it rewrites the kept entries.

NaN and bad ids: a NaN in a selected row, a teacher L of −inf (no distribution) or a kept id outside [0, V) gives a
NaN KD row and a NaN gradient row (ids are device data: checked in the kernel, never read at a bad index); a row
that is not selected gives 0 whatever it holds. Repeated ids in a row are outside the contract.

Cost: the student row is read twice (walks 1 and 3, as the dense kernel does for rows wider than one block), the K
kept entries four times (gathers, mostly from L2), and the gradient written once plus K entries; the teacher side is
K·(4 + 4) + 4 bytes per row for fp32 logits and int32 ids, against V·2 for a bf16 dense teacher row (K = 64,
V = 30522: 1/118).
"""

from typing import NamedTuple

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
from kernels._tiles import register_cap, round_to, sparse_kd_tiles
from kernels.reference_sparse import sparse_kd_ce_rows_reference


@triton.jit
def _load_kept(
    s_ptr, tv_ptr, ti_ptr, sk_ptr, rows, kc, k_ok, stride_s, stride_tv, stride_ti, stride_sk, V,
    GATHERED: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_N, BLOCK_K) block of the kept entries: (ids made safe, id in range, student z there, teacher t)."""
    idx = tl.load(ti_ptr + rows[:, None] * stride_ti + kc[None, :], mask=k_ok, other=0).to(tl.int64)
    in_v = (idx >= 0) & (idx < V)
    idx = tl.where(in_v, idx, 0)
    if GATHERED:
        z = tl.load(sk_ptr + rows[:, None] * stride_sk + kc[None, :], mask=k_ok, other=float("-inf"))
    else:
        z = tl.load(s_ptr + rows[:, None] * stride_s + idx, mask=k_ok & in_v, other=float("-inf"))
    t = tl.load(tv_ptr + rows[:, None] * stride_tv + kc[None, :], mask=k_ok, other=float("-inf"))
    return idx, in_v, z.to(tl.float32), t.to(tl.float32)


@triton.jit
def _sparse_kd_ce_fwd_kernel(
    s_ptr,  # (N, V) student logits, fp32/bf16/fp16, unit column stride
    tv_ptr,  # (N, K) teacher logits at the kept ids (not divided by T), fp32/bf16/fp16, unit column stride
    ti_ptr,  # (N, K) int32/int64 kept vocabulary ids, unit column stride
    lse_ptr,  # (N,) float teacher log-sum-exp of t/T over its whole row
    sk_ptr,  # (N, K) student logits at the kept ids, gathered before launch (only with GATHERED)
    y_ptr,  # (N,) int32/int64 labels (unused without HAS_LABELS)
    kd_mask_ptr,  # (N,) uint8 KD row mask (unused without HAS_KD_MASK)
    kd_scale_ptr,  # () fp32
    ce_scale_ptr,  # () fp32
    kd_row_ptr,  # (N,) fp32 out
    ce_row_ptr,  # (N,) fp32 out
    g_ptr,  # (N, V) student dtype out (unused without COMPUTE_GRAD); aliases s_ptr only with GATHERED
    N,
    V,
    K,
    stride_s,
    stride_tv,
    stride_ti,
    stride_sk,
    stride_g,
    inv_t,
    temperature,
    smoothing,
    ignore_index,
    HAS_LABELS: tl.constexpr,
    HAS_KD_MASK: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    ONE_TEMP: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    GATHERED: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    out_rows, row_ok, rows, kd_on, ce_on, in_range, y, s_y = row_setup(
        s_ptr, y_ptr, kd_mask_ptr, N, V, stride_s, ignore_index, HAS_LABELS, HAS_KD_MASK, BLOCK_N
    )
    cols = tl.arange(0, BLOCK)
    kcols = tl.arange(0, BLOCK_K)

    # Walk 0 (with a tail): start the running maximum at the kept entries' maximum M_K. Then walk 1 never rescales
    # unless a tail entry exceeds M_K, so its terms exp((z − M)/T) at the kept ids are bit for bit walk 2's, and the
    # fp64 sums d_s − d_K cancel them exactly: s_tail keeps its accuracy however small it is (module docstring).
    m_s = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    if HAS_TAIL:
        for kstart in range(0, K, BLOCK_K):
            kc = kstart + kcols
            k_ok = row_ok[:, None] & (kc < K)[None, :]
            _, _, z, _ = _load_kept(s_ptr, tv_ptr, ti_ptr, sk_ptr, rows, kc, k_ok, stride_s, stride_tv, stride_ti,
                                    stride_sk, V, GATHERED)  # fmt: skip
            m_s = tl.maximum(m_s, tl.max(z, axis=1))

    # Walk 1: the student row (online softmax at T, and at 1 for the CE).
    d_s = tl.zeros([BLOCK_N], dtype=tl.float64)
    d_1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    s_sum = d_1
    for start in range(0, V, BLOCK):
        mask = (start + cols < V)[None, :]
        z = tl.load(s_ptr + rows[:, None] * stride_s + (start + cols)[None, :], mask=mask, other=float("-inf"))
        z = z.to(tl.float32)
        m_new = tl.maximum(m_s, tl.max(z, axis=1))
        sh = shift(m_new)
        x = z - sh[:, None]
        d_s = d_s * tl.exp((m_s - sh) * inv_t).to(tl.float64) + tl.sum(tl.exp(x * inv_t).to(tl.float64), axis=1)
        if HAS_LABELS:
            if not ONE_TEMP:
                d_1 = d_1 * tl.exp(m_s - sh) + tl.sum(tl.exp(x), axis=1)
            if HAS_SMOOTHING:
                s_sum += tl.sum(tl.where(mask, z - s_y[:, None], 0.0), axis=1)
        m_s = m_new
    sh = shift(m_s)
    log_ds = tl.log(d_s.to(tl.float32))
    log_d1 = log_ds
    if HAS_LABELS and not ONE_TEMP:
        log_d1 = tl.log(d_1)

    # Walk 2: the kept entries.
    lse_t = tl.load(lse_ptr + rows).to(tl.float32)
    d_k = tl.zeros([BLOCK_N], dtype=tl.float64)
    q_sum = d_k
    a = tl.zeros([BLOCK_N], dtype=tl.float32)
    bad = tl.zeros([BLOCK_N], dtype=tl.int1)
    for kstart in range(0, K, BLOCK_K):
        kc = kstart + kcols
        k_ok = row_ok[:, None] & (kc < K)[None, :]
        idx, in_v, z, t = _load_kept(s_ptr, tv_ptr, ti_ptr, sk_ptr, rows, kc, k_ok, stride_s, stride_tv,
                                     stride_ti, stride_sk, V, GATHERED)  # fmt: skip
        bad = bad | (tl.sum(tl.where(k_ok & ~in_v, 1, 0), axis=1) > 0)
        log_q = t * inv_t - lse_t[:, None]
        q = tl.where(k_ok, tl.exp(log_q), 0.0)
        xt = (z - sh[:, None]) * inv_t
        d_k += tl.sum(tl.exp(xt).to(tl.float64), axis=1)
        q_sum += tl.sum(q.to(tl.float64), axis=1)
        # 0·log 0 = 0 where q = 0; `q == 0` rather than `q > 0` so that a NaN q poisons the row.
        a += tl.sum(tl.where(q == 0.0, 0.0, q * (log_q - xt)), axis=1)

    q_sum32 = q_sum.to(tl.float32)
    kl = a + q_sum32 * log_ds
    q_tail = tl.zeros([BLOCK_N], dtype=tl.float32)
    log_dtail = q_tail
    if HAS_TAIL:
        q_tail = tl.maximum(1.0 - q_sum, 0.0).to(tl.float32)
        d_tail = tl.maximum(d_s - d_k, 0.0)
        log_s_tail = tl.log((d_tail / d_s).to(tl.float32))
        # q_tail (log q_tail − log s_tail); +inf where the student has no tail and the teacher has.
        kl += tl.where(q_tail == 0.0, 0.0, q_tail * (tl.log(q_tail) - log_s_tail))
        # log d_tail (relative to the shift M); +inf for an empty tail, so p_v/s_tail = exp(x_v/T − log d_tail) is 0
        log_dtail = tl.where(d_tail > 0.0, tl.log(d_tail.to(tl.float32)), float("inf"))
    q_all = q_sum32 + q_tail  # 1, up to rounding, unless the stored targets overshoot 1 (the tail clamped to 0)
    kl = tl.where(bad, float("nan"), kl)
    poison = kd_on & (kl != kl)  # a NaN KD row has a NaN gradient row, however the NaN came in
    kd = tl.where(kd_on, kl * (temperature * temperature), 0.0)  # where, not a 0 factor: ignored rows may hold NaN
    ce = ce_row(sh, s_y, log_d1, s_sum, smoothing, V, ce_on, in_range, HAS_LABELS, HAS_SMOOTHING)
    store_rows(kd_row_ptr, ce_row_ptr, out_rows, row_ok, kd, ce)

    if COMPUTE_GRAD:
        kd_coef = tl.load(kd_scale_ptr) * temperature
        ce_coef = tl.load(ce_scale_ptr)
        # Walk 3a: every entry with the tail formula kd_coef·(Q'p_v − q_tail·p_v/s_tail) (+ the CE term). p_v/s_tail
        # is the student's share of its own tail, ≤ 1; the clamp keeps it so where d_tail lost bits to the difference.
        for start in range(0, V, BLOCK):
            c = start + cols
            mask = (c < V)[None, :]
            z = tl.load(s_ptr + rows[:, None] * stride_s + c[None, :], mask=mask, other=float("-inf"))
            x = z.to(tl.float32) - sh[:, None]
            p = tl.exp(x * inv_t - log_ds[:, None])
            share = tl.minimum(tl.exp(x * inv_t - log_dtail[:, None]), 1.0)
            g = tl.where(kd_on[:, None], kd_coef * (q_all[:, None] * p - q_tail[:, None] * share), 0.0)
            if HAS_LABELS:
                g += ce_grad(x, c[None, :], y, ce_on, in_range, ce_coef, log_d1, smoothing, V)
            g = tl.where(poison[:, None], float("nan"), g)
            tl.store(g_ptr + out_rows[:, None] * stride_g + c[None, :], round_to(g, g_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & mask)  # fmt: skip
        # Every thread's tail stores land before any kept entry is rewritten (a kept id may be another thread's).
        tl.debug_barrier()
        # Walk 3b: the kept entries, kd_coef·(Q'p_v − q_v) (+ the CE term), scattered over the tail formula.
        for kstart in range(0, K, BLOCK_K):
            kc = kstart + kcols
            k_ok = row_ok[:, None] & (kc < K)[None, :]
            idx, in_v, z, t = _load_kept(s_ptr, tv_ptr, ti_ptr, sk_ptr, rows, kc, k_ok, stride_s, stride_tv,
                                         stride_ti, stride_sk, V, GATHERED)  # fmt: skip
            x = z - sh[:, None]
            q = tl.exp(t * inv_t - lse_t[:, None])
            g = tl.where(kd_on[:, None], kd_coef * (q_all[:, None] * tl.exp(x * inv_t - log_ds[:, None]) - q), 0.0)
            if HAS_LABELS:
                g += ce_grad(x, idx, y, ce_on, in_range, ce_coef, log_d1, smoothing, V)
            tl.store(g_ptr + out_rows[:, None] * stride_g + idx, round_to(g, g_ptr.dtype.element_ty),
                     mask=k_ok & in_v & ~poison[:, None])  # fmt: skip


def sparse_kd_ce_fwd(student, topk_logits, topk_indices, teacher_lse, labels, kd_mask, temperature, kd_scale,
                     ce_scale, label_smoothing, ignore_index, compute_grad, grad_out):  # fmt: skip
    """Launch `_sparse_kd_ce_fwd_kernel`; arguments and returns as `sparse_kd_ce_rows` (inputs already validated)."""
    n, v = student.shape
    k = topk_logits.shape[1]
    student, topk_logits, topk_indices = (_kd_ce.unit_columns(x) for x in (student, topk_logits, topk_indices))
    kd_row, ce_row, grad, y, m, kd_scale, ce_scale = _kd_ce.launch_buffers(
        student, labels, kd_mask, kd_scale, ce_scale, compute_grad, grad_out
    )
    if n == 0:
        return kd_row, ce_row, grad
    block_n, block, num_warps = sparse_kd_tiles(v, student.dtype)
    block_k = min(triton.next_power_of_2(k), block)  # K ≤ V: a (BLOCK_N, BLOCK_K) block is at most a row tile
    # In place, walk 3a overwrites the row before walk 3b reads the kept logits: gather them first. A bad id is
    # clamped for the gather only; the kernel still sees it and poisons the row.
    gathered = grad is not None and grad.data_ptr() == student.data_ptr()
    sk = student.gather(1, topk_indices.long().clamp(0, v - 1)) if gathered else student
    g = student if grad is None else grad
    _sparse_kd_ce_fwd_kernel[(triton.cdiv(n, block_n),)](
        student, topk_logits, topk_indices, teacher_lse.contiguous(), sk, y, m, kd_scale, ce_scale, kd_row, ce_row, g,
        n, v, k,
        student.stride(0), topk_logits.stride(0), topk_indices.stride(0), sk.stride(0), g.stride(0),
        1.0 / temperature, float(temperature), float(label_smoothing), int(ignore_index),
        HAS_LABELS=labels is not None, HAS_KD_MASK=kd_mask is not None, HAS_SMOOTHING=label_smoothing > 0,
        ONE_TEMP=temperature == 1.0, HAS_TAIL=k < v, GATHERED=gathered, COMPUTE_GRAD=compute_grad,
        BLOCK_N=block_n, BLOCK=block, BLOCK_K=block_k, num_warps=num_warps, maxnreg=register_cap(num_warps),
    )  # fmt: skip
    if grad_out is not None:
        torch.autograd.graph.increment_version(grad_out)  # written behind autograd's back
    return kd_row, ce_row, grad


def sparse_kd_ce_rows(
    student: torch.Tensor,
    topk_logits: torch.Tensor,
    topk_indices: torch.Tensor,
    teacher_lse: torch.Tensor,
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
    """Per-row sparse KD and CE losses and the student-logit gradient in one kernel (contract:
    `kernels.reference_sparse.sparse_kd_ce_rows_reference`).

    Args:
        student: (N, V) float logits, V ≥ 1.
        topk_logits: (N, K) float, 1 ≤ K ≤ V: the teacher's logits at `topk_indices`, not divided by T. A constant.
        topk_indices: (N, K) int32/int64 vocabulary ids, distinct per row; an id outside [0, V) gives a NaN KD row.
        teacher_lse: (N,) float: log Σ_v exp(t_v/T) over the teacher's whole row, at this `temperature`.
        labels: (N,) int class ids or `ignore_index`, or None (KD only).
        kd_mask: (N,) bool rows that take the KD term; None: all.
        temperature: T > 0. kd_scale, ce_scale: the rows' weights in the caller's loss (floats or () device tensors,
            never read on the host); they scale only the gradient. label_smoothing: ε in [0, 1].
        compute_grad: whether to write the gradient. grad_out: optional (N, V) buffer of the student's dtype with unit
            column stride, which may be `student` itself.

    Returns:
        kd_row (N,) fp32, ce_row (N,) fp32 (fp64 for fp64 inputs), grad (N, V) in the student's dtype or None.
    """
    check.tensor("student", student, "float", ndim=2)
    check.logits("student", student)
    check.topk_targets(student, topk_logits, topk_indices, teacher_lse)
    temperature, kd_scale, ce_scale, label_smoothing, ignore_index = _kd_ce.check_row_args(
        student, labels, kd_mask, temperature, kd_scale, ce_scale, label_smoothing, ignore_index, grad_out
    )
    if use_triton(student, topk_logits, topk_indices, teacher_lse, labels, kd_mask):
        return sparse_kd_ce_fwd(student, topk_logits, topk_indices, teacher_lse, labels, kd_mask, temperature,
                                kd_scale, ce_scale, label_smoothing, ignore_index, compute_grad, grad_out)  # fmt: skip
    with torch.no_grad():
        kd_row, ce_row, grad = sparse_kd_ce_rows_reference(
            student, topk_logits, topk_indices, teacher_lse, labels, kd_mask, temperature, kd_scale, ce_scale,
            label_smoothing, ignore_index, compute_grad,
        )  # fmt: skip
        if grad_out is not None and grad is not None:
            grad = grad_out.copy_(grad)
    return kd_row, ce_row, grad


class SparseKDCELossFunction(torch.autograd.Function):
    """kd_weight·KD + ce_weight·CE over rows against sparse teacher targets; the student gradient is made in forward
    and scaled in backward (`kernels._grad`)."""

    @staticmethod
    def forward(ctx, student, topk_logits, topk_indices, teacher_lse, labels, kd_mask, temperature, kd_weight,
                ce_weight, ignore_index):  # fmt: skip
        # |∂kd_row/∂z| ≤ T as for the dense loss: |p − q| ≤ 1, and p(1 − r) = p − q_tail·(p/s_tail) is a difference
        # of two numbers in [0, 1] (p ≤ s_tail), which the kernel keeps so. The fp16 factor K follows from that bound.
        n_kd, n_ce, kd_scale, ce_scale, k = _kd_ce.loss_scales(
            student, labels, kd_mask, True, temperature, kd_weight, ce_weight, ignore_index
        )
        kd_row, ce_row, grad = sparse_kd_ce_rows(
            student, topk_logits, topk_indices, teacher_lse, labels, kd_mask, temperature, kd_scale * k,
            ce_scale * k, ignore_index=ignore_index, compute_grad=ctx.needs_input_grad[0],
        )  # fmt: skip
        return _kd_ce.weighted_means(ctx, kd_row, ce_row, grad, n_kd, n_ce, k, kd_weight, ce_weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_kd, grad_ce):
        return _kd_ce.stored_grad_backward(ctx, grad_loss, 10)


def sparse_distill_loss(
    student_logits: torch.Tensor,
    topk_logits: torch.Tensor,
    topk_indices: torch.Tensor,
    teacher_lse: torch.Tensor,
    labels: torch.Tensor | None = None,
    kd_mask: torch.Tensor | None = None,
    temperature: float = 2.0,
    kd_weight: float = 1.0,
    ce_weight: float = 1.0,
    ignore_index: int = -100,
) -> DistillLossOutput:
    """`distill_loss` against a teacher stored as top-K logits + log-sum-exp: T²·KL over K + 1 buckets (batchmean
    over KD rows) plus CE, in one pass over the student logits. Equal to `distill_loss` when K = V.

    Args:
        student_logits: (..., V) fp32/bf16/fp16 (fp64 runs the reference).
        topk_logits: (..., K) float, 1 ≤ K ≤ V: the teacher's logits at `topk_indices` (raw, not divided by T).
        topk_indices: (..., K) int32/int64 distinct vocabulary ids.
        teacher_lse: (...) float: logsumexp(t/T) over the teacher's whole row at `temperature` (`sparse_targets`).
        labels, kd_mask, temperature, kd_weight, ce_weight, ignore_index: as `distill_loss`.

    Returns:
        DistillLossOutput of () fp32 tensors; only `loss` is differentiable. Empty selections give 0, NaN in a
        selected row gives NaN.

    Raises:
        ValueError naming the argument, for inputs outside this contract (host checks only, no device sync).
    """
    check.logits("student_logits", student_logits)
    check.topk_targets(student_logits, topk_logits, topk_indices, teacher_lse)
    temperature, ignore_index = _kd_ce.check_label_rows(student_logits, labels, kd_mask, temperature, ignore_index)
    kd_weight, ce_weight = check.weight("kd_weight", kd_weight), check.weight("ce_weight", ce_weight)
    s, labels = flat_rows(student_logits, labels)
    tv, kd_mask = flat_rows(topk_logits, kd_mask)
    ti = topk_indices.reshape(-1, topk_indices.shape[-1])
    if torch.compiler.is_compiling():  # one registered op for torch.compile (kernels._library); eager never comes here
        from kernels import _library

        out = _library.sparse_distill_loss(s, tv, ti, teacher_lse.reshape(-1), labels, kd_mask, temperature, kd_weight,
                                           ce_weight, ignore_index)  # fmt: skip
        return DistillLossOutput(*out)
    out = SparseKDCELossFunction.apply(s, tv, ti, teacher_lse.reshape(-1), labels, kd_mask, temperature, kd_weight,
                                       ce_weight, ignore_index)  # fmt: skip
    return DistillLossOutput(*out)


class SparseTargets(NamedTuple):
    """A teacher's rows as `sparse_distill_loss` takes them (and a teacher cache stores them)."""

    values: torch.Tensor  # (..., K) float: the teacher's logits at `indices`, not divided by T
    indices: torch.Tensor  # (..., K) int32/int64 distinct vocabulary ids
    lse: torch.Tensor  # (...) float: logsumexp(t/T) over the teacher's whole row


@torch.no_grad()
def sparse_targets(teacher_logits: torch.Tensor, k: int, temperature: float) -> SparseTargets:
    """A teacher's logits (..., V) → SparseTargets(top-K logits (..., K) fp32, their ids (..., K) int32,
    logsumexp(t/T) (...) fp32). K ≥ V keeps every entry (ids in vocabulary order, so the result is the dense row:
    exact). Ties at the K-th logit are broken by `torch.topk`; any choice is exact for the ids it keeps."""
    check.logits("teacher_logits", teacher_logits)
    temperature = check.temperature(temperature)
    v = teacher_logits.shape[-1]
    k = check.integer("k", k, 1)
    t = teacher_logits.float()
    lse = torch.logsumexp(t / temperature, dim=-1)
    if k >= v:
        ids = torch.arange(v, device=t.device).expand_as(t)
        return SparseTargets(t.clone(), ids.to(torch.int32).contiguous(), lse)
    values, ids = torch.topk(t, k, dim=-1)
    return SparseTargets(values, ids.to(torch.int32), lse)


class SparseDistillLoss(WeightedLossModule):
    """Module form of `sparse_distill_loss`: SparseDistillLoss(temperature=2.0, kd_weight=1.0, ce_weight=1.0,
    ignore_index=-100)."""

    def forward(self, student_logits, topk_logits, topk_indices, teacher_lse, labels=None,
                kd_mask=None) -> DistillLossOutput:  # fmt: skip
        return sparse_distill_loss(student_logits, topk_logits, topk_indices, teacher_lse, labels, kd_mask,
                                   self.temperature, self.kd_weight, self.ce_weight, self.ignore_index)  # fmt: skip
