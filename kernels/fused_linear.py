"""LM-head-fused distillation and cross-entropy losses that never hold a [rows × vocab] logits tensor.

Given packed rows h_s (N, H) of the student with its vocabulary projection W_s (V, H), b_s (V), and
optionally the teacher's rows h_t (N, H_t) with W_t (V, H_t), b_t, the loss is

    S = h_s W_sᵀ + b_s,  T = h_t W_tᵀ + b_t                                    (N, V), never whole
    L = kd_weight · (1/n_kd) Σ_{n ∈ KD rows} kd_row[n] + ce_weight · (1/n_ce) Σ_{n: y_n ≠ ignore} ce_row[n]

with kd_row / ce_row the per-row terms of `kd_ce_rows` (KL(p_t ‖ p_s)·T² at temperature τ and
cross-entropy with optional label smoothing ε; see `kernels.reference`) and n_kd, n_ce the counts of
KD rows and labelled rows, clamped to ≥ 1 so that an empty selection gives L = 0, not 0/0.

Gradient. With G = ∂L/∂S (N, V), whose row n `kd_ce_rows` returns for kd_scale = kd_weight/n_kd and
ce_scale = ce_weight/n_ce:

    G[n]     = kd_scale · τ (p_s − p_t) + ce_scale · (softmax(S[n]) − (1−ε) onehot(y_n) − ε/V)
    ∂L/∂h_s  = G W_s          (N, H)
    ∂L/∂W_s  = Gᵀ h_s         (V, H)
    ∂L/∂b_s  = Σ_n G[n]       (V,)

G is linear in the rows, so all three can be formed chunk by chunk of rows during the forward
(the Liger-Kernel / Cut-Cross-Entropy idea): per chunk of C rows both projections are computed into
reusable (C, V) buffers, `kd_ce_rows` writes G into the student buffer in place, and G is consumed
by the three matmuls at once. Backward only multiplies the stored gradients by the scalar upstream
gradient. Extra memory is O(C·V + V·H + N·H), independent of N's product with V; the row counts stay
on the device (no host sync). Matmuls run in the compute dtype (the autocast dtype under
`torch.autocast`, else the inputs' dtype) with fp32 accumulation; the three gradients are kept in
fp32 until the backward, which multiplies them by the upstream gradient and rounds them once to the
dtypes of h_s, W_s and b_s; 16-bit matmuls write fp32 outputs, so a chunk's partial ∂L/∂W_s is not
rounded before it is summed.

fp16 under loss scaling. An fp16 G formed at upstream 1 would flush the small entries that the loss
scale of fp16 training exists to keep (see `kernels._grad`). So for an fp16 compute dtype G is
written as K·G, K a power of two from the weights' bound B = |kd_scale|·τ + |ce_scale| with
K·B ∈ [2¹⁴, 2¹⁵), and the backward multiplies by upstream/K. K·G's matmuls then sum values up to
2¹⁵ over V or C terms, past fp16's 65504, so for fp16 they write fp32 outputs (cuBLAS accumulates in
fp32 in any case); the stored K·∂L/∂h_s, K·∂L/∂W_s, K·∂L/∂b_s are fp32 and exact multiples of the
true ones. Accuracy as stated in `kernels._grad`, plus the matmuls' fp32 accumulation.
"""

import torch

from kernels import _contract as check
from kernels._grad import grad_scale_for
from kernels._kd_ce import DistillLossOutput, abs_scale
from kernels.distill import kd_ce_rows

# `torch.mm(a, b, out_dtype=torch.float32)` for fp16 operands exists on CUDA in recent PyTorch builds; the op
# registry says whether this build has it (a property of the build, not of any device).
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()

# Default budget for one chunk's logits (student + teacher, in the compute dtype): 256 MiB. At BERT's
# V = 30522 in bf16 with a teacher that is 2192 rows a chunk, large enough to keep the three
# (C × V × H) matmuls of a chunk near tensor-core peak, and small beside the unfused path's 2 × N × V
# logits (2 GiB at N = 16384). The reference path on CPU uses a few more fp32 (C, V) temporaries.
DEFAULT_MEMORY_BUDGET_BYTES = 256 * 2**20


def chunk_rows(n_rows: int, vocab: int, bytes_per_logit: int, memory_budget_bytes: int) -> int:
    """Rows per chunk so that one chunk's logits (`bytes_per_logit` summed over student and teacher) fit
    `memory_budget_bytes`: a multiple of 8 (tensor-core friendly) when above 8, at least 1, at most `n_rows`."""
    rows = memory_budget_bytes // max(1, vocab * bytes_per_logit)
    if rows > 8:
        rows -= rows % 8
    return max(1, min(rows, n_rows))


def _project(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """out (C, V) = h (C, H) @ w (V, H)ᵀ + b (V,), all in out's dtype (fp32 accumulation in the matmul)."""
    if b is None:
        return torch.mm(h, w.t(), out=out)
    return torch.addmm(b, h, w.t(), out=out)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b, with an fp32 output for 16-bit operands: each chunk's partial gradient is then summed across chunks
    unrounded (one rounding in all, in the backward, where unfused torch also rounds once), and fp16's K-scaled
    sums, which can pass 65504, cannot overflow."""
    if a.dtype not in (torch.float16, torch.bfloat16):
        return a @ b
    if a.is_cuda:
        if _MM_OUT_DTYPE:
            return torch.mm(a, b, out_dtype=torch.float32)
        if a.dtype == torch.bfloat16:
            return a @ b  # builds without it: bf16 needs no fp32 for range, and an upcast copy would cost (C, V)
    return a.float() @ b.float()  # CPU (the interpreter's tests) and fp16 on older builds: correct, slower


def fused_linear_distill_fwd(
    h_s: torch.Tensor,  # (N, H) student rows
    w_s: torch.Tensor,  # (V, H) student projection
    b_s: torch.Tensor | None,  # (V,)
    h_t: torch.Tensor | None,  # (N, H_t) teacher rows, or None: no KD
    w_t: torch.Tensor | None,  # (V, H_t)
    b_t: torch.Tensor | None,  # (V,)
    labels: torch.Tensor | None,  # (N,) int, ignore_index where unlabelled, or None: no CE
    kd_mask: torch.Tensor | None,  # (N,) bool KD rows, or None: all rows
    temperature: float,
    kd_weight: float,
    ce_weight: float,
    label_smoothing: float,
    ignore_index: int,
    chunk: int,
    dtype_s: torch.dtype,
    dtype_t: torch.dtype,
    needs_grad: tuple[bool, bool, bool],  # which of (h_s, w_s, b_s) want a gradient
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """Loss, KD and CE means (0-dim fp32), the gradients of the loss for (h_s, w_s, b_s) times K, and K.

    Gradients come back in fp32 (fp64 for fp64 runs), None where not wanted, summed over chunks;
    K is the power of two of the module docstring (1 unless the compute dtype is fp16).
    """
    n, v, dev = h_s.shape[0], w_s.shape[0], h_s.device
    acc = torch.promote_types(torch.float32, dtype_s)  # accumulation dtype: fp32, or fp64 for fp64 runs
    kd_on, ce_on = h_t is not None, labels is not None
    # Counts stay on the device; clamp_min(1) turns an empty selection into 0/1 = 0, never 0/0.
    n_kd = torch.full((), n, device=dev, dtype=acc) if kd_mask is None else kd_mask.sum().to(acc)
    n_kd = n_kd.clamp_min(1)
    n_ce = labels.ne(ignore_index).sum().to(acc).clamp_min(1) if ce_on else torch.ones((), device=dev, dtype=acc)
    kd_scale = kd_weight / n_kd if kd_on else 0.0
    ce_scale = ce_weight / n_ce if ce_on else 0.0
    k = grad_scale_for(dtype_s, abs_scale(kd_scale) * temperature + abs_scale(ce_scale))

    ws = w_s.to(dtype_s)
    bs = None if b_s is None else b_s.to(dtype_s)
    s_buf = torch.empty(min(chunk, n), v, device=dev, dtype=dtype_s)
    if kd_on:
        wt = w_t.to(dtype_t)
        bt = None if b_t is None else b_t.to(dtype_t)
        t_buf = torch.empty(min(chunk, n), v, device=dev, dtype=dtype_t)
    compute_grad = any(needs_grad)
    grad_h = torch.empty(h_s.shape, device=dev, dtype=acc) if needs_grad[0] else None
    grad_w = torch.zeros(v, h_s.shape[1], device=dev, dtype=acc) if needs_grad[1] else None
    grad_b = torch.zeros(v, device=dev, dtype=acc) if needs_grad[2] else None
    kd_sum = torch.zeros((), device=dev, dtype=acc)
    ce_sum = torch.zeros((), device=dev, dtype=acc)

    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        hs = h_s[rows].to(dtype_s)  # (C, H)
        m = hs.shape[0]
        s = _project(hs, ws, bs, s_buf[:m])  # (C, V)
        t = _project(h_t[rows].to(dtype_t), wt, bt, t_buf[:m]) if kd_on else None
        kd_row, ce_row, g = kd_ce_rows(
            s,
            t,
            labels[rows] if ce_on else None,
            None if kd_mask is None else kd_mask[rows],
            temperature=temperature,
            kd_scale=kd_scale * k,
            ce_scale=ce_scale * k,
            label_smoothing=label_smoothing,
            ignore_index=ignore_index,
            compute_grad=compute_grad,
            grad_out=s if compute_grad else None,  # G = ∂L/∂S overwrites the student logits
        )
        kd_sum += kd_row.sum()
        ce_sum += ce_row.sum()
        if grad_h is not None:
            grad_h[rows] = _mm(g, ws)  # (C, V) @ (V, H)
        if grad_w is not None:
            grad_w += _mm(g.t(), hs)  # (V, C) @ (C, H)
        if grad_b is not None:
            grad_b += g.sum(0, dtype=acc)

    kd = kd_sum / n_kd
    ce = ce_sum / n_ce
    loss = kd_weight * kd + ce_weight * ce
    return loss, kd, ce, [grad_h, grad_w, grad_b], k


class FusedLinearDistillLossFunction(torch.autograd.Function):
    """Autograd wrapper: the forward computes loss and gradients together, the backward scales them."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, labels, kd_mask, temperature, kd_weight, ce_weight,
                label_smoothing, ignore_index, chunk, dtype_s, dtype_t, grad_enabled):  # fmt: skip
        # Matmul dtypes are chosen by the caller (from the autocast state) and applied explicitly here.
        # needs_input_grad ignores an enclosing torch.no_grad(), hence the caller's grad mode.
        needs_grad = tuple(grad_enabled and x for x in ctx.needs_input_grad[:3])
        with torch.autocast(h_s.device.type, enabled=False):
            loss, kd, ce, grads, k = fused_linear_distill_fwd(
                h_s, w_s, b_s, h_t, w_t, b_t, labels, kd_mask, temperature, kd_weight, ce_weight,
                label_smoothing, ignore_index, chunk, dtype_s, dtype_t, needs_grad,
            )  # fmt: skip
        ctx.save_for_backward(*grads)
        ctx.grad_scale, ctx.dtypes = k, [None if x is None else x.dtype for x in (h_s, w_s, b_s)]
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        # The stored gradients are K·∂L/∂x for an upstream gradient of 1: the chain rule scales them by upstream/K
        # (exact, K a power of two), and each is rounded once to its input's dtype.
        factor = grad_loss / ctx.grad_scale
        grads = tuple(None if g is None else (g * factor).to(d) for g, d in zip(ctx.saved_tensors, ctx.dtypes))
        return grads + (None,) * 14


def _compute_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on for x's device, else the promoted dtype of x and w."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.promote_types(x.dtype, w.dtype)


def _check(h_s, w_s, b_s, h_t, w_t, b_t, labels, kd_mask, temperature, kd_weight, ce_weight, ignore_index,
           chunk_size, memory_budget_bytes, label_smoothing):  # fmt: skip
    """The contract of `fused_linear_distill_loss` (argument names as its own); returns the checked scalars."""
    check.tensor("student_hidden", h_s, ndim=2)
    dev, (n, h) = h_s.device, h_s.shape
    check.tensor("student_weight", w_s, ndim=2, device=dev)
    v = w_s.shape[0]
    check.tensor("student_weight", w_s, shape=(v, h))
    if v < 1:
        raise ValueError(f"student_weight must have at least one row (V ≥ 1), got shape {tuple(w_s.shape)}")
    check.optional_tensor("student_bias", b_s, shape=(v,), device=dev)
    if h_t is None:
        if labels is None:
            raise ValueError("fused_linear_distill_loss needs a teacher (KD), labels (CE), or both; got neither")
        for name, x in (("teacher_weight", w_t), ("teacher_bias", b_t), ("kd_mask", kd_mask)):
            if x is not None:
                raise ValueError(f"{name} was given without teacher_hidden: pass the teacher's rows too, or drop it")
    else:
        check.tensor("teacher_hidden", h_t, ndim=2, device=dev)
        check.tensor("teacher_hidden", h_t, shape=(n, h_t.shape[1]))
        check.tensor("teacher_weight", w_t, shape=(v, h_t.shape[1]), device=dev)
        check.optional_tensor("teacher_bias", b_t, shape=(v,), device=dev)
    for name, x in (("teacher_hidden", h_t), ("teacher_weight", w_t), ("teacher_bias", b_t)):
        check.constant(name, x)
    check.optional_tensor("labels", labels, kind="int", shape=(n,), device=dev)
    check.optional_tensor("kd_mask", kd_mask, kind="bool", shape=(n,), device=dev)
    check.integer("ignore_index", ignore_index)
    if chunk_size is not None:
        check.integer("chunk_size", chunk_size, low=1)
    if memory_budget_bytes is not None:
        check.integer("memory_budget_bytes", memory_budget_bytes, low=1)
    return (
        check.temperature(temperature),
        check.weight("kd_weight", kd_weight),
        check.weight("ce_weight", ce_weight),
        check.real("label_smoothing", label_smoothing, 0.0, 1.0),
    )


def fused_linear_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    labels: torch.Tensor | None = None,
    kd_mask: torch.Tensor | None = None,
    temperature: float = 2.0,
    kd_weight: float = 1.0,
    ce_weight: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    memory_budget_bytes: int | None = None,
    label_smoothing: float = 0.0,
) -> DistillLossOutput:
    """KD (T²·KL, mean over KD rows) + CE (mean over labelled rows) through both vocab projections, chunked.

    Args:
        student_hidden: (N, H) float, the student's packed rows; the gradient flows to it.
        student_weight: (V, H) float, the student's vocab projection (may be tied to the word embeddings).
        student_bias: (V,) float or None.
        teacher_hidden: (N, H_t) float or None (no KD term); must not require grad.
        teacher_weight: (V, H_t) float, required with teacher_hidden; must not require grad.
        teacher_bias: (V,) float or None; must not require grad.
        labels: (N,) int with `ignore_index` on rows without a label, or None (no CE term). A label outside
            [0, V) that is not `ignore_index` makes the loss and the gradients NaN.
        kd_mask: (N,) bool, the rows that take the KD term; None: all rows.
        temperature: KD softmax temperature τ.
        kd_weight, ce_weight: weights of the two means in `loss`.
        ignore_index: label value of rows without CE.
        chunk_size: rows per chunk; None: `chunk_rows(...)` for `memory_budget_bytes`.
        memory_budget_bytes: budget of one chunk's logits; None: `DEFAULT_MEMORY_BUDGET_BYTES` (256 MiB).
        label_smoothing: ε of the CE term.

    Returns:
        DistillLossOutput(loss, kd, ce) of 0-dim fp32 tensors: loss = kd_weight·kd + ce_weight·ce is
        differentiable; kd and ce (unweighted means, 0 when absent) are for logging only.

    Raises:
        ValueError naming the argument, for inputs outside this contract (all tensors on one device;
        chunk_size and memory_budget_bytes integers ≥ 1), checked on the host without a device sync.
    """
    temperature, kd_weight, ce_weight, label_smoothing = _check(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels, kd_mask,
        temperature, kd_weight, ce_weight, ignore_index, chunk_size, memory_budget_bytes, label_smoothing,
    )  # fmt: skip
    n, v = student_hidden.shape[0], student_weight.shape[0]
    dtype_s = _compute_dtype(student_hidden, student_weight)
    dtype_t = dtype_s if teacher_hidden is None else _compute_dtype(teacher_hidden, teacher_weight)
    if chunk_size is None:
        bytes_per_logit = dtype_s.itemsize + (0 if teacher_hidden is None else dtype_t.itemsize)
        budget = DEFAULT_MEMORY_BUDGET_BYTES if memory_budget_bytes is None else memory_budget_bytes
        chunk_size = chunk_rows(n, v, bytes_per_logit, budget)
    if torch.compiler.is_compiling():  # one registered op for torch.compile (kernels._library); eager never comes here
        from kernels import _library

        return DistillLossOutput(*_library.fused_linear_distill_loss(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels,
            kd_mask, temperature, kd_weight, ce_weight, label_smoothing, ignore_index, chunk_size, dtype_s, dtype_t,
        ))  # fmt: skip
    loss, kd, ce = FusedLinearDistillLossFunction.apply(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels,
        kd_mask, temperature, kd_weight, ce_weight, label_smoothing, ignore_index, chunk_size, dtype_s, dtype_t,
        torch.is_grad_enabled(),
    )  # fmt: skip
    return DistillLossOutput(loss, kd, ce)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
    memory_budget_bytes: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of (hidden @ weightᵀ + bias) against labels, without materializing the logits.

    Args:
        hidden: (N, H) float; weight: (V, H) float; bias: (V,) float or None.
        labels: (N,) int64, `ignore_index` on rows that do not count.
        label_smoothing: ε; chunk_size, memory_budget_bytes: as in `fused_linear_distill_loss`.

    Returns:
        0-dim fp32 tensor, the mean over labelled rows (0 when there are none).
    """
    return fused_linear_distill_loss(
        hidden, weight, bias, None, None, None, labels, kd_weight=0.0, ce_weight=1.0, ignore_index=ignore_index,
        chunk_size=chunk_size, memory_budget_bytes=memory_budget_bytes, label_smoothing=label_smoothing,
    ).loss  # fmt: skip


class FusedLinearDistillLoss(torch.nn.Module):
    """Module form of `fused_linear_distill_loss` (the projections are passed in, so they can be tied)."""

    def __init__(self, temperature=2.0, kd_weight=1.0, ce_weight=1.0, ignore_index=-100, chunk_size=None,
                 memory_budget_bytes=None):  # fmt: skip
        super().__init__()
        self.temperature, self.kd_weight, self.ce_weight = temperature, kd_weight, ce_weight
        self.ignore_index, self.chunk_size, self.memory_budget_bytes = ignore_index, chunk_size, memory_budget_bytes

    def forward(self, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                labels=None, kd_mask=None) -> DistillLossOutput:  # fmt: skip
        return fused_linear_distill_loss(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels,
            kd_mask, self.temperature, self.kd_weight, self.ce_weight, self.ignore_index, self.chunk_size,
            self.memory_budget_bytes,
        )  # fmt: skip


class FusedLinearCrossEntropyLoss(torch.nn.Module):
    """Module form of `fused_linear_cross_entropy`."""

    def __init__(self, ignore_index=-100, label_smoothing=0.0, chunk_size=None, memory_budget_bytes=None):
        super().__init__()
        self.ignore_index, self.label_smoothing = ignore_index, label_smoothing
        self.chunk_size, self.memory_budget_bytes = chunk_size, memory_budget_bytes

    def forward(self, hidden, weight, bias, labels) -> torch.Tensor:
        return fused_linear_cross_entropy(
            hidden, weight, bias, labels, self.ignore_index, self.label_smoothing, self.chunk_size,
            self.memory_budget_bytes,
        )  # fmt: skip
