"""Cosine embedding loss between student and teacher hidden states, forward and backward fused.

Per row n of width H with student s, teacher t (a constant) and eps = 1e-8, as torch's `cosine_similarity`:

    n_s = max(‖s‖, eps),  n_t = max(‖t‖, eps),  cos = s·t / (n_s n_t)
    loss = Σ_{n selected} (1 − cos_n) / max(#selected, 1)          (CosineEmbeddingLoss with target 1)

Gradient with respect to s, from ∂‖s‖/∂s = s/‖s‖:

    ∂(1 − cos)/∂s = −t / (n_s n_t) + cos · s / n_s²

(the second term only where ‖s‖ > eps; below it the clamped norm is a constant). One program per block of rows:
pass 1 reduces s·t, ‖s‖², ‖t‖² in fp32, pass 2 writes the gradient scaled by 1/#selected. A row that fits one
block (H ≤ 4096 at 2 bytes, e.g. BERT's 768) stays in registers: one read of s and t, one write of the gradient.
The loss returns the gradient from forward and multiplies it by the upstream gradient in backward.
"""

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from kernels import _contract as check
from kernels._dispatch import use_triton
from kernels._tiles import round_to, row_tiles
from kernels.reference import cosine_rows_reference

EPS = 1e-8  # torch.nn.functional.cosine_similarity's default


@triton.jit
def _cosine_fwd_kernel(
    s_ptr,  # (N, H) student hidden states, fp32/bf16/fp16, unit column stride
    t_ptr,  # (N, H) teacher hidden states, fp32/bf16/fp16, unit column stride
    mask_ptr,  # (N,) uint8 selected rows (unused without HAS_MASK)
    scale_ptr,  # () fp32 gradient scale, 1/#selected
    loss_row_ptr,  # (N,) fp32 out: 1 − cos, 0 for unselected rows
    g_ptr,  # (N, H) student dtype out (unused without COMPUTE_GRAD)
    N,
    H,
    stride_s,
    stride_t,
    stride_g,
    eps,
    HAS_MASK: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK: tl.constexpr,
):
    out_rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # 64-bit row offsets
    row_ok = out_rows < N
    rows = tl.minimum(out_rows, N - 1)  # padding rows re-read row N−1 and are never stored
    cols = tl.arange(0, BLOCK)
    s_rows = s_ptr + rows[:, None] * stride_s
    t_rows = t_ptr + rows[:, None] * stride_t
    on = row_ok
    if HAS_MASK:
        on = tl.load(mask_ptr + rows) != 0

    # Pass 1: s·t, ‖s‖², ‖t‖² in fp32.
    dot = tl.zeros([BLOCK_N], dtype=tl.float32)
    ss = tl.zeros([BLOCK_N], dtype=tl.float32)
    tt = tl.zeros([BLOCK_N], dtype=tl.float32)
    if SINGLE_TILE:
        mask = (cols < H)[None, :]
        s = tl.load(s_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dot, ss, tt = tl.sum(s * t, axis=1), tl.sum(s * s, axis=1), tl.sum(t * t, axis=1)
    else:
        for start in range(0, H, BLOCK):
            mask = (start + cols < H)[None, :]
            sb = tl.load(s_rows + start + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tb = tl.load(t_rows + start + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dot += tl.sum(sb * tb, axis=1)
            ss += tl.sum(sb * sb, axis=1)
            tt += tl.sum(tb * tb, axis=1)
    norm_s = tl.sqrt(ss)
    n_s = tl.maximum(norm_s, eps)
    n_t = tl.maximum(tl.sqrt(tt), eps)
    cos = dot / (n_s * n_t)
    tl.store(loss_row_ptr + out_rows, tl.where(on, 1.0 - cos, 0.0), mask=row_ok)

    # Pass 2: grad = scale·(−t/(n_s n_t) + cos·s/n_s²), 0 for unselected rows.
    if COMPUTE_GRAD:
        scale = tl.load(scale_ptr)
        c_t = tl.where(on, -scale / (n_s * n_t), 0.0)[:, None]
        c_s = tl.where(on & (norm_s > eps), scale * cos / (n_s * n_s), 0.0)[:, None]
        g_rows = g_ptr + out_rows[:, None] * stride_g
        if SINGLE_TILE:
            g = c_t * t + c_s * s
            tl.store(g_rows + cols[None, :], round_to(g, g_ptr.dtype.element_ty), mask=row_ok[:, None] & mask)
        else:
            for start in range(0, H, BLOCK):
                mask = (start + cols < H)[None, :]
                sb = tl.load(s_rows + start + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                tb = tl.load(t_rows + start + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                g = c_t * tb + c_s * sb
                tl.store(
                    g_rows + start + cols[None, :], round_to(g, g_ptr.dtype.element_ty), mask=row_ok[:, None] & mask
                )


def cosine_fwd(student, teacher, mask, scale, compute_grad):
    """Launch `_cosine_fwd_kernel`: (loss_row (N,) fp32, grad (N, H) student dtype or None)."""
    if student.stride(1) != 1:  # vector loads need unit column strides; rows may be strided
        student = student.contiguous()
    if teacher.stride(1) != 1:
        teacher = teacher.contiguous()
    n, h = student.shape
    loss_row = torch.empty(n, dtype=torch.float32, device=student.device)
    grad = torch.empty((n, h), dtype=student.dtype, device=student.device) if compute_grad else None
    if n > 0:
        block_n, block, num_warps = row_tiles(h, student.dtype)
        if not isinstance(scale, torch.Tensor):  # torch.full fills on the device; as_tensor would copy from host
            scale = torch.full((), scale, dtype=torch.float32, device=student.device)
        _cosine_fwd_kernel[(triton.cdiv(n, block_n),)](
            student, teacher, student if mask is None else mask.contiguous().to(torch.bool).view(torch.uint8), scale,
            loss_row, student if grad is None else grad, n, h, student.stride(0), teacher.stride(0),
            0 if grad is None else grad.stride(0), EPS,
            HAS_MASK=mask is not None, COMPUTE_GRAD=compute_grad, SINGLE_TILE=h <= block, BLOCK_N=block_n,
            BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
    return loss_row, grad


def cosine_rows(student, teacher, mask, scale, compute_grad):
    """Per-row 1 − cos and its gradient times `scale`: the kernel where `use_triton` says so, else the reference."""
    if use_triton(student, teacher, mask):
        return cosine_fwd(student, teacher, mask, scale, compute_grad)
    return cosine_rows_reference(student, teacher, mask, scale, EPS, compute_grad)


class CosineLossFunction(torch.autograd.Function):
    """Mean over selected rows of 1 − cos(s, t); the gradient to s is made in forward and scaled in backward."""

    @staticmethod
    def forward(ctx, student, teacher, mask):
        count = float(max(student.shape[0], 1)) if mask is None else mask.sum().clamp_min(1).to(torch.float32)
        loss_row, grad = cosine_rows(student, teacher, mask, 1.0 / count, ctx.needs_input_grad[0])
        ctx.save_for_backward(grad)
        return loss_row.sum() / count  # a device count clamped to ≥ 1: no sync, no rows → 0

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        # In place: no second (N, H) buffer; a second backward fails autograd's saved-tensor version check.
        return grad.mul_(grad_loss), None, None


def cosine_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over selected rows of 1 − cos(s, t), as CosineEmbeddingLoss with target 1 (DistilBERT's L_cos).

    Args:
        student_hidden: (..., H) fp32/bf16/fp16 (fp64 runs the reference); receives the gradient.
        teacher_hidden: (..., H) any float dtype; a constant: ValueError if it requires grad.
        mask: (...) bool rows that count; None: all rows.

    Returns:
        () fp32; 0 (and a 0 gradient) when no row is selected. eps = 1e-8 clamps each norm, like
        `torch.nn.functional.cosine_similarity`.
    """
    check.constant("teacher_hidden", teacher_hidden)
    h = student_hidden.shape[-1]
    s, t = student_hidden.reshape(-1, h), teacher_hidden.reshape(-1, h)
    return CosineLossFunction.apply(s, t, None if mask is None else mask.reshape(-1))


class CosineLoss(torch.nn.Module):
    """Module form of `cosine_loss`."""

    def forward(self, student_hidden, teacher_hidden, mask=None) -> torch.Tensor:
        return cosine_loss(student_hidden, teacher_hidden, mask)
